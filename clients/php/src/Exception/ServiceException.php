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
    /** @var list<mixed>|null */
    private ?array $results = null;

    /**
     * For a batch (Client::addMany, Client::getMany) that this cut short: what became of
     * each request, in order. Each is its value (an id, a result) or its ReplyException
     * if it was answered; the exception that cut the batch (a ServiceDownException or
     * TimeoutException) if it was sent without a reply, so it may have run (a job may
     * be queued); null if it was never sent. Null for anything else. A batch that a stop
     * of the service cut is a ServiceDownException whose results hold, for each request
     * answered "503: Shutting down", a ServiceDownException of its own (it may have run).
     *
     * @return list<mixed>|null
     */
    public function getResults(): ?array
    {
        return $this->results;
    }

    /**
     * This exception again (the same class, message, code and cause, and what carryOver()
     * keeps), with $results.
     *
     * @internal for Connection::requests() and Client, which build the results
     *
     * @param list<mixed> $results
     */
    final public function withResults(array $results, ?string $message = null, ?\Throwable $previous = null): static
    {
        // Every class of this library that a batch can be cut by takes RuntimeException's
        // constructor; BatchException, which does not, is never cut short.
        $copy = new static($message ?? $this->getMessage(), $this->getCode(), $previous ?? $this->getPrevious());
        $copy->results = $results;
        $this->carryOver($copy);
        return $copy;
    }

    /**
     * Copy onto $copy, withResults()'s of this exception, what a subclass carries beyond
     * the message, code, cause and results (a TimeoutException's job, and whether its
     * request was sent): a batch cut short must not lose it.
     */
    protected function carryOver(ServiceException $copy): void
    {
    }
}
