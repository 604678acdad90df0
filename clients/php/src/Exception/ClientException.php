<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * Marks every exception this library throws, so that one `catch (ClientException $e)`
 * takes them all (as Predis\PredisException and Pheanstalk's exceptions do).
 *
 * Two families implement it: ServiceException (a RuntimeException: the service replied
 * an error, is down, or did not answer in time) and InvalidArgumentException (the
 * caller's mistake, found before anything is sent).
 */
interface ClientException extends \Throwable
{
}
