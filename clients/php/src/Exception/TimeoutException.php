<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * No reply within the timeout. The connection is dropped with it, so that the late
 * reply is never read as the next request's. Old name: BackgroundServiceTimeout.
 */
class TimeoutException extends ServiceException
{
}
