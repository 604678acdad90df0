<?php

declare(strict_types=1);

namespace Bgservice\Client;

/**
 * One framed reply (docs/protocol.md): a status (200 is OK, as in HTTP) and a body of
 * any bytes. The framing is what makes a status impossible to confuse with data.
 */
final class Reply
{
    public const OK = 200;

    public function __construct(
        public readonly int $status,
        public readonly string $body,
    ) {
    }

    public function isOk(): bool
    {
        return $this->status === self::OK;
    }
}
