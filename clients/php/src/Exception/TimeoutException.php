<?php

declare(strict_types=1);

namespace Bgservice\Client\Exception;

/**
 * No reply within the timeout. The connection is dropped with it, so that the late
 * reply is never read as the next request's. Old name: BackgroundServiceTimeout.
 *
 * That of get(), getMany() or run() says in its message what the call waited for and
 * whose timeout ran out (as the Python client's ClientTimeout does): getJobId() is the
 * job that get() or getMany() waited for, to follow it with check() or get() later
 * instead of adding it again; wasSent() whether the request had been written, so that
 * it may have run (for run(): its job may have been queued).
 */
class TimeoutException extends ServiceException
{
    private ?int $jobId = null;

    private bool $sent = false;

    /**
     * The timeout of a request written whole whose reply did not come in time.
     *
     * @internal for Connection, which knows what it wrote
     */
    public static function noReply(string $address): self
    {
        $e = new self("no reply from $address in time");
        $e->sent = true;
        return $e;
    }

    /**
     * The id of the job that get() waited for (getMany(): the first without a reply); null
     * from any other call. run() has none to give: the service replies the result only.
     */
    public function getJobId(): ?int
    {
        return $this->jobId;
    }

    /**
     * Whether the request had been written when the time ran out: it may have run (a
     * run()'s job may be queued, and goes on). False if the service took none of it, or
     * a new connection's greeting did not come in time: nothing was sent.
     */
    public function wasSent(): bool
    {
        return $this->sent;
    }

    /**
     * Adds to the message what the call waited for ($waited), and the job it names.
     * In place, as the Python client's waiting_for() does: the exception thrown on keeps
     * its trace and getResults().
     *
     * @internal for Client, which knows what the call waited for
     */
    public function waitedFor(string $waited, ?int $jobId = null): void
    {
        $this->message = "{$this->getMessage()}: $waited";
        $this->jobId = $jobId;
    }

    protected function carryOver(ServiceException $copy): void
    {
        if ($copy instanceof self) {  // (always: withResults() makes one of this class)
            $copy->jobId = $this->jobId;
            $copy->sent = $this->sent;
        }
    }
}
