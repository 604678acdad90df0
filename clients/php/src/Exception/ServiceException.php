<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * Talking to the service failed. The base of ReplyException, ServiceDownException and
 * TimeoutException; also thrown as itself for a reply that breaks the protocol.
 *
 * getCode() is the reply's status (docs/protocol.md) where there is one, else 0.
 * The old global name BackgroundServiceException is an alias of this class, so code
 * that caught it still catches every failure it caught before.
 */
class ServiceException extends \RuntimeException implements ClientException
{
}
