<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * The service cannot be reached: not running, wrong address, connection lost, or it
 * refused the connection with a 5xx (503: too many connections); or it is shutting down
 * (its "503: Shutting down" reply: the request may have run); or a reply longer than the
 * client takes (ReplyTooLargeException: the connection is closed). The one to catch for a
 * fallback (the original's README ran `lessc` itself). Old name: BackgroundServiceDown.
 */
class ServiceDownException extends ServiceException
{
}
