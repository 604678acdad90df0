<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * The service cannot be reached: not running, wrong address, connection lost. The one
 * to catch for a fallback (the original's README ran `lessc` itself). Old name:
 * BackgroundServiceDown.
 */
class ServiceDownException extends ServiceException
{
}
