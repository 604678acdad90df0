<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * A reply whose header says it is longer than the client's $maxReplyBytes (getSize(),
 * getLimit()): a peer that is no bgservice (a wrong port), a broken one, or a module's
 * reply beyond what the caller takes. Thrown as soon as the header is read, before the
 * body is held; the connection is closed with it, since the rest of that reply would be
 * read as the next call's, and the request is not sent again (it may have run). A
 * ServiceDownException, so a fallback takes it, as the Python client's ReplyTooLarge
 * (a ServiceDown).
 */
class ReplyTooLargeException extends ServiceDownException
{
    private int $size = 0;

    private int $limit = 0;

    /**
     * The reply $address announced as $size bytes, more than $limit.
     *
     * @internal for Connection, which reads the header
     */
    public static function announced(string $address, int $size, int $limit): self
    {
        $e = new self("$address sent a reply of $size bytes, more than maxReplyBytes=$limit: "
            . 'the connection is closed (the request may have run)');
        $e->size = $size;
        $e->limit = $limit;
        return $e;
    }

    /** The length the reply's header said, in bytes. */
    public function getSize(): int
    {
        return $this->size;
    }

    /** The client's $maxReplyBytes when it was read. */
    public function getLimit(): int
    {
        return $this->limit;
    }

    protected function carryOver(ServiceException $copy): void
    {
        if ($copy instanceof self) {  // (always: withResults() makes one of this class)
            $copy->size = $this->size;
            $copy->limit = $this->limit;
        }
    }
}
