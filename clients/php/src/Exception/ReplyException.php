<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * The service (or a module) replied an error: getCode() is its status (400, 404, 410,
 * 500, 503, 504 ... docs/protocol.md), getMessage() its text. The connection stays good.
 * Not the service's "503: Shutting down", which is a ServiceDownException.
 */
class ReplyException extends ServiceException
{
}
