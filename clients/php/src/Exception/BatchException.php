<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * Some requests of a batch (Client::addMany, Client::getMany) had an error reply; the
 * others were served. getResults() holds, in request order, each one's value or its
 * ReplyException; getCode() is the first failure's status.
 */
class BatchException extends ReplyException
{
    /** @param list<mixed> $results */
    public function __construct(private readonly array $results)
    {
        $failures = array_values(array_filter($results, fn ($r): bool => $r instanceof ReplyException));
        $first = $failures[0] ?? null;
        parent::__construct(
            sprintf('%d of %d failed, first: %s', count($failures), count($results), $first?->getMessage() ?? ''),
            $first?->getCode() ?? 500,
        );
    }

    /** @return list<mixed> */
    public function getResults(): array
    {
        return $this->results;
    }
}
