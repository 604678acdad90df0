<?php

declare(strict_types=1);

namespace Bgservice\Client;

use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\ReplyTooLargeException;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;

/**
 * One framed-protocol stream to the service (docs/protocol.md), opened on first use and
 * kept: for the life of the object, or of the PHP-FPM worker when $persistent is true.
 *
 * A request is a 4-byte big-endian length and the payload; a reply is a 3-digit status,
 * a 4-byte length and the body. Standard streams only, no extension needed.
 */
final class Connection
{
    /** Sent first on a new connection and echoed by the service: "this client frames". */
    public const PREFACE = "\x00:F1";

    /** Pipelined requests written before their replies are read: the service's default
     *  [limits] max_pipeline, up to which it keeps reading a connection. */
    public const WINDOW = 64;

    /** The longest timeout taken, the client's or a call's: a week, as in the Python
     *  client (bgservice.client_async.MAX_TIMEOUT). */
    public const MAX_TIMEOUT = 7 * 24 * 3600.0;

    /** The longest reply read by default ($maxReplyBytes), 64 MiB: four times the
     *  service's own [limits] max_request_bytes, as in the Python client
     *  (bgservice.client.MAX_REPLY_BYTES). */
    public const MAX_REPLY_BYTES = 64 << 20;

    /** The most asked of one fread(): PHP reserves what it is asked for before reading, so
     *  a reply's body is read this much at a time, not its whole length at once. */
    private const READ_CHUNK = 1 << 20;

    /**
     * A stream's chunk size while an exchange (greeting, requests, their replies) is under
     * way on it; PHP's own, IDLE_CHUNK, once it is done. The mark is kept in the stream,
     * so it lasts as long as a persistent stream does: the next PHP request of a worker
     * sees that its previous one ended mid-call (exit(), a fatal error) even when this
     * library's shutdown function never ran to close the stream (an earlier shutdown
     * function called exit()), and does not read that call's late reply as its own.
     */
    private const BUSY_CHUNK = 8191;
    private const IDLE_CHUNK = 8192;

    /** The most read of a refusal the service writes instead of the greeting. */
    private const REFUSAL_BYTES = 1024;

    /** @var string stream_socket_client's form of the address: tcp://... or unix://... */
    private readonly string $target;

    /** @var resource|null */
    private $stream = null;

    /** Whether the last exchange wrote any of its requests (requests() tells "may have
     *  run" from "not sent" with it). */
    private bool $sent = false;

    /**
     * Streams in the middle of an exchange in this PHP request. A call that finds its
     * stream here runs inside the one that left it there (a signal handler; a shutdown
     * function after exit() or a fatal error, where no finally ran): it leaves it alone,
     * as that call may yet go on, and takes a stream of its own. Whatever is still here
     * when the script ends is closed by a shutdown function, so that the service is not
     * left waiting for the rest of half a request. (Statics last one PHP request.)
     *
     * @var array<int, resource>
     */
    private static array $busy = [];

    /** @var array<int, int> the process that opened each stream: a fork() child inherits
     *  its parent's streams and statics, and must not talk on them */
    private static array $owners = [];

    private static bool $guarded = false;

    /**
     * @param string $address    "host:port", "[v6]:port", "unix:///path" or a Unix
     *                           socket's path ("/run/bg.sock", "unix:/run/bg.sock"); see target()
     * @param float  $timeout    seconds to wait for a reply, and for a new stream's greeting
     *                           (a call's own $timeout, if it gives one, for both)
     * @param bool   $persistent keep the stream across requests of a PHP-FPM worker
     * @param int    $maxReplyBytes the longest reply read: one whose header says more is a
     *                           ReplyTooLargeException, and its stream is closed
     *
     * @throws InvalidArgumentException $address is none of those forms, $timeout is not
     *                                  a number of seconds > 0, at most MAX_TIMEOUT, or
     *                                  $maxReplyBytes is less than 1
     */
    public function __construct(
        private readonly string $address,
        private readonly float $timeout,
        private readonly bool $persistent,
        private readonly int $maxReplyBytes = self::MAX_REPLY_BYTES,
    ) {
        $this->target = self::target($address);
        self::checkTimeout($timeout);
        if ($maxReplyBytes < 1) {
            throw new InvalidArgumentException(
                "maxReplyBytes must be 1 or more (the longest reply read, in bytes), not $maxReplyBytes"
            );
        }
    }

    /**
     * $address as stream_socket_client() takes it, if it is one of the forms the clients
     * document (docs/clients.md; the Python client's bgservice.client_requests.parse_address
     * takes the same): "host:port" or "[v6]:port" (TCP, or UDP for a $datagram address);
     * "unix:///path", "unix:PATH" or a path with a "/" in it (a Unix stream socket, or a
     * datagram one for a $datagram address); "udg:///path" (a datagram address only).
     * "tcp://host:port" (and "udp://host:port" for a datagram) are taken too: PHP's own
     * forms, which the client passed on as they were. Anything else failed only at the
     * first call, as a service down (or a timeout, or a send() that went nowhere): a
     * mistake in the configuration hidden by the caller's fallback.
     *
     * @return string tcp://, udp://, unix:// or udg:// and the rest
     *
     * @throws InvalidArgumentException none of those forms
     */
    public static function target(string $address, bool $datagram = false): string
    {
        $unix = $datagram ? 'udg://' : 'unix://';
        $inet = $datagram ? 'udp://' : 'tcp://';
        if (preg_match('~\A([A-Za-z][A-Za-z0-9+.-]*)://(.*)\z~s', $address, $url) === 1) {
            $scheme = strtolower($url[1]);
            if ($scheme === 'udg' && !$datagram) {
                throw new InvalidArgumentException(
                    "address '$address' is a Unix datagram socket: pass it as \$udpAddress, for send()"
                );
            }
            if ($scheme === 'unix' || $scheme . '://' === $unix) {
                return $unix . self::path($address, $url[2]);
            }
            if ($scheme . '://' === $inet) {
                return $inet . self::hostPort($address, $url[2], $datagram);
            }
            throw self::badAddress($address, $datagram);
        }
        if (str_contains($address, '/') || str_starts_with($address, 'unix:')) {
            return $unix . self::path($address, str_starts_with($address, 'unix:') ? substr($address, 5) : $address);
        }
        return $inet . self::hostPort($address, $address, $datagram);
    }

    private static function path(string $address, string $path): string
    {
        if ($path === '' || str_contains($path, "\0")) {
            throw new InvalidArgumentException("address '$address' names no Unix socket path");
        }
        return $path;
    }

    private static function hostPort(string $address, string $hostPort, bool $datagram): string
    {
        $host = '(?:\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9._-]+)?\]|[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?)';
        if (preg_match("~\\A$host:([0-9]{1,5})\\z~", $hostPort, $match) === 1
            && (int)$match[1] >= 1 && (int)$match[1] <= 65535) {
            return $hostPort;
        }
        if (substr_count($hostPort, ':') > 1 && !str_starts_with($hostPort, '[')) {
            throw new InvalidArgumentException(
                "address '$address': an IPv6 address takes brackets, as in [::1]:12341"
            );
        }
        throw self::badAddress($address, $datagram);
    }

    private static function badAddress(string $address, bool $datagram): InvalidArgumentException
    {
        $shown = var_export(strlen($address) > 80 ? substr($address, 0, 80) . '...' : $address, true);
        return new InvalidArgumentException($datagram
            ? "\$udpAddress must be host:port, [v6]:port, udg:///path or a Unix datagram socket's path, not $shown"
            : "address must be host:port, [v6]:port, unix:///path or a Unix socket's path, not $shown");
    }

    /**
     * $seconds, if a timeout can be that: more than 0 and at most MAX_TIMEOUT. Unchecked,
     * -1 waited for ever (a negative stream timeout is none), INF and anything past
     * PHP_INT_MAX seconds were cast to 0 or a negative int (at once, or never), and NAN
     * threw PHP's own \ValueError, which is no ClientException.
     *
     * @throws InvalidArgumentException it cannot
     */
    private static function checkTimeout(float $seconds): float
    {
        if (!($seconds > 0 && $seconds <= self::MAX_TIMEOUT)) {  // NAN compares false to all
            throw new InvalidArgumentException(
                'timeout must be more than 0 and at most ' . self::MAX_TIMEOUT
                . ' seconds (a week), not ' . var_export($seconds, true)
            );
        }
        return $seconds;
    }

    public function __destruct()
    {
        if (!$this->persistent && $this->stream !== null) {
            $this->release($this->stream);
        }
    }

    /** Close the stream now; the next request opens a new one. */
    public function close(): void
    {
        if ($this->stream !== null) {
            $this->release($this->stream);
        }
    }

    /**
     * Send one request and read its reply.
     *
     * @throws ServiceDownException the service cannot be reached or the stream broke
     * @throws ReplyTooLargeException the reply's header says more than $maxReplyBytes (a
     *                              ServiceDownException): the stream is closed
     * @throws TimeoutException     no reply within $timeout (default: the constructor's)
     * @throws ReplyException       the service refused the connection with a 4xx (403: this
     *                              host is not in its allow list)
     * @throws InvalidArgumentException $timeout is not one (checkTimeout()): nothing is sent
     */
    public function request(string $payload, ?float $timeout = null): Reply
    {
        $timeout = $timeout === null ? $this->timeout : self::checkTimeout($timeout);
        $replies = [];
        $this->exchange(pack('N', strlen($payload)) . $payload, 1, $timeout, $replies);
        return $replies[0];
    }

    /**
     * Several requests, pipelined: written WINDOW at a time in one fwrite, then their
     * replies read, so neither side's buffers fill up waiting for the other. The service
     * serves them concurrently and replies in order.
     *
     * A failure part way keeps what is known: the exception's getResults() holds each
     * request's Reply, if it came; the exception itself if the request was sent without a
     * reply (it may have run); null if it was never sent.
     *
     * @param list<string> $payloads
     *
     * @return list<Reply> in the order of $payloads
     *
     * @throws InvalidArgumentException $timeout is not one (checkTimeout()): nothing is sent
     */
    public function requests(array $payloads, ?float $timeout = null): array
    {
        $timeout = $timeout === null ? $this->timeout : self::checkTimeout($timeout);
        $replies = [];
        foreach (array_chunk($payloads, self::WINDOW) as $window => $chunk) {
            $frames = '';
            foreach ($chunk as $payload) {
                $frames .= pack('N', strlen($payload)) . $payload;
            }
            try {
                $this->exchange($frames, count($chunk), $timeout, $replies);
            } catch (ServiceException $e) {
                $sent = $window * self::WINDOW + ($this->sent ? count($chunk) : 0);
                throw self::cutShort($e, $replies, $sent, count($payloads));
            }
        }
        return $replies;
    }

    /**
     * $e again, for a batch of $total requests it cut short once $replies had come and
     * $sent were written (those answered among them): as the Python client's cut_short()
     * (bgservice.client_requests), message and all. Its getResults(), in request order:
     * each Reply that came; $e for one sent without a reply (it may have run: a job may
     * be queued, so it is not to be sent again blindly); null for one never sent.
     *
     * @param list<Reply> $replies
     */
    private static function cutShort(ServiceException $e, array $replies, int $sent, int $total): ServiceException
    {
        $unanswered = $sent - count($replies);
        $unsent = $total - $sent;
        $summary = [count($replies) . ' answered'];
        if ($unanswered > 0) {
            $summary[] = "$unanswered sent without a reply (they may have run)";
        }
        if ($unsent > 0) {
            $summary[] = "$unsent not sent";
        }
        $message = sprintf('%s; a batch of %d cut short: %s (getResults() has each)',
            $e->getMessage(), $total, implode(', ', $summary));
        $results = [...$replies, ...array_fill(0, $unanswered, $e), ...array_fill(0, $unsent, null)];
        return $e->withResults($results, $message, $e);
    }

    /**
     * Write $frames and read $count replies onto $replies, each as it comes: a batch cut
     * short (a timeout, the connection lost) keeps those that came before.
     *
     * Never sends a request twice: a kept stream is checked before it is used (open()),
     * and one the service had closed meanwhile (idle timeout, restart) is replaced then,
     * before anything is written. Only a write that the kept stream refuses outright,
     * with not a byte of it accepted, is tried again on a new stream. Once the request is
     * written, losing the connection is a ServiceDownException: the service may have run
     * it, and sending it again could, e.g., queue a job twice.
     *
     * The stream is closed unless every reply was read whole, whatever interrupted the
     * exchange (a timeout, a broken connection, a reply longer than $maxReplyBytes, which
     * throws as soon as its header is read, an exception from a signal handler), so
     * that no later request reads this one's reply. Where no finally runs (exit(), a
     * fatal error), the stream's busy mark does it: open() never hands it out again.
     *
     * @param float       $timeout this call's: for a new stream's connect and greeting too,
     *                             so that a call given longer than the client's waits as
     *                             long for a busy service (as the Python client does)
     * @param list<Reply> $replies
     */
    private function exchange(string $frames, int $count, float $timeout, array &$replies): void
    {
        for ($attempt = 1; ; $attempt++) {
            $this->sent = false;
            [$stream, $reused] = $this->open($timeout);
            $complete = false;
            $written = 0;
            self::markBusy($stream);
            try {
                stream_set_timeout($stream, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
                $this->write($stream, $frames, $written);
                if ($written === 0 && $reused && $attempt === 1) {
                    continue;  // nothing sent on a stale kept stream (finally closes it)
                }
                if ($written < strlen($frames)) {
                    throw new ServiceDownException($written === 0
                        ? "connection to {$this->address} lost before the request was sent"
                        : "connection to {$this->address} lost while sending the request: it may have run");
                }
                for ($i = 0; $i < $count; $i++) {
                    $head = $this->readReply($stream, 7);
                    /** @var array{1: int} $size readReply gave 7 bytes, so unpack cannot fail */
                    $size = unpack('N', $head, 3);
                    if ($size[1] > $this->maxReplyBytes) {  // before any of its body is held
                        throw ReplyTooLargeException::announced($this->address, $size[1], $this->maxReplyBytes);
                    }
                    $body = $size[1] > 0 ? $this->readReply($stream, $size[1]) : '';
                    $replies[] = new Reply((int)substr($head, 0, 3), $body);
                }
                $complete = true;
                return;
            } finally {
                $this->sent = $written > 0;
                $this->settle($stream, $complete);
            }
        }
    }

    /**
     * The kept stream if it is still good, else a new one that has spoken the preface.
     *
     * @param float $timeout seconds to connect (5 at most) and to wait for the greeting
     *
     * @return array{0: resource, 1: bool} the stream, and whether it was kept from before
     *
     * @throws ServiceDownException no connection (refused, unreachable, not in time), or
     *                              the service refused it (503: too many connections)
     * @throws ReplyException       the service refused it with a 4xx (403: not allowed)
     * @throws TimeoutException     connected, but no greeting within $timeout
     */
    private function open(float $timeout): array
    {
        if ($this->stream !== null) {
            if (self::reusable($this->stream)) {
                return [$this->stream, true];
            }
            $this->release($this->stream);
        }
        $stream = $this->dial($timeout, $this->persistent);
        // A persistent stream may be one this PHP-FPM worker kept from an earlier request,
        // one that another Client of this process holds, or one a fork() child inherited:
        // its position is then past the preface. It is used only if it is good (closed
        // meanwhile, left with bytes to read, or marked busy by a call that did not
        // finish, it is not: it is closed, for its other holders too, who will see it
        // closed), and this process's (a child closes its copy, which leaves the parent's
        // open, and opens its own).
        if ($this->persistent && ftell($stream) !== 0) {
            if (self::reusable($stream)) {
                // Kept from an earlier PHP request (statics start empty): this process's.
                self::$owners[(int)$stream] ??= getmypid();
                $this->stream = $stream;
                return [$stream, true];
            }
            if (isset(self::$busy[(int)$stream])) {
                // A call of this process is on it, and may go on once we return (we run
                // in a signal handler, or a shutdown function): left to that call.
                $stream = $this->dial($timeout, false);
            } else {
                self::discard($stream);
                $stream = $this->dial($timeout, true);
            }
        }
        $this->greet($stream, $timeout);
        $this->stream = $stream;
        return [$stream, false];
    }

    /**
     * Speak the preface on a new $stream and read the service's echo; closes it if that
     * fails.
     *
     * @param resource $stream
     */
    private function greet($stream, float $timeout): void
    {
        self::$owners[(int)$stream] = getmypid();
        self::markBusy($stream);
        $greeted = false;
        try {
            stream_set_timeout($stream, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
            // Connected: the kernel completes a connect even while the service's loop is
            // blocked (a module's long synchronous call), so a greeting that does not come
            // in time is a busy service, as a late reply is, not a service down.
            try {
                $sent = 0;
                $this->write($stream, self::PREFACE, $sent);
                $echoed = $sent === strlen(self::PREFACE) ? $this->readExact($stream, strlen(self::PREFACE)) : null;
            } catch (TimeoutException $e) {
                throw new TimeoutException("{$this->address} accepted but did not greet in time", 0, $e);
            } catch (ServiceDownException $e) {
                throw new ServiceDownException("{$this->address}: no framed-protocol greeting", 0, $e);
            }
            if ($echoed !== null && preg_match('/\A[45][0-9]{2}:/', $echoed) === 1) {
                throw $this->refusal($echoed . stream_get_contents($stream, self::REFUSAL_BYTES));
            }
            if ($echoed !== self::PREFACE) {
                throw new ServiceDownException($echoed !== null
                    ? "{$this->address} does not speak the framed protocol"
                    : "{$this->address}: connection lost while sending the preface");
            }
            $greeted = true;
        } finally {
            $this->settle($stream, $greeted);
        }
    }

    /**
     * The service refused the connection before any request: it writes the reason as the
     * original's one-shot protocol does, "NNN: message", and closes (e.g. "403: Forbidden"
     * for a host not in its allow list, "503: Too many connections" at [limits]
     * max_connections, "503: Shutting down"). A 5xx is the service unable to serve now, as
     * when it is down (the caller's fallback applies); a 4xx is a refusal of this client.
     */
    private function refusal(string $reply): ServiceException
    {
        $status = (int)substr($reply, 0, 3);
        $text = trim(substr($reply, 4));
        $message = "{$this->address} refused the connection: $status $text";
        return $status >= 500 ? new ServiceDownException($message, $status) : new ReplyException($message, $status);
    }

    /**
     * A connected stream: new, or this process's persistent one for the address.
     *
     * @return resource
     */
    private function dial(float $timeout, bool $persistent)
    {
        $flags = STREAM_CLIENT_CONNECT | ($persistent ? STREAM_CLIENT_PERSISTENT : 0);
        $stream = @stream_socket_client($this->target, $errno, $errstr, min($timeout, 5.0), $flags);
        if ($stream === false) {
            throw new ServiceDownException("cannot reach the service at {$this->address}: $errstr");
        }
        return $stream;
    }

    /**
     * A stream fit for the next request: still open (a persistent stream is shared by the
     * Clients of a process, and any of them may have closed it), this process's, no call
     * on it left unfinished (in this PHP request or an earlier one: BUSY_CHUNK), and with
     * nothing to read. Readable means the service closed it (EOF) or bytes were left over
     * from a call that did not finish; either way it is of no use. Checked without waiting.
     *
     * @param resource $stream
     */
    private static function reusable($stream): bool
    {
        if (!self::isOpen($stream) || isset(self::$busy[(int)$stream])
            || (self::$owners[(int)$stream] ?? getmypid()) !== getmypid()) {
            return false;
        }
        if (stream_set_chunk_size($stream, self::IDLE_CHUNK) === self::BUSY_CHUNK) {
            return false;
        }
        $read = [$stream];
        $write = $except = null;
        return @stream_select($read, $write, $except, 0) === 0;
    }

    /** @param resource $stream about to be written to, and its replies read */
    private static function markBusy($stream): void
    {
        self::$busy[(int)$stream] = $stream;
        stream_set_chunk_size($stream, self::BUSY_CHUNK);
        if (!self::$guarded) {
            self::$guarded = true;
            register_shutdown_function(static function (): void {
                foreach (self::$busy as $busy) {
                    self::discard($busy);
                }
                self::$busy = [];
            });
        }
    }

    /**
     * The end of an exchange on $stream: marked idle if it $completed, else closed (half
     * read or half written, it is of no use to anyone after).
     *
     * @param resource $stream
     */
    private function settle($stream, bool $completed): void
    {
        unset(self::$busy[(int)$stream]);
        if ($completed) {
            stream_set_chunk_size($stream, self::IDLE_CHUNK);
        } else {
            $this->release($stream);
        }
    }

    /**
     * Let go of $stream, ours: closed, unless a call of this process that may yet go on
     * is in the middle of it (this call runs inside that one), which keeps it.
     *
     * @param resource $stream
     */
    private function release($stream): void
    {
        if ($this->stream === $stream) {
            $this->stream = null;
        }
        if (!isset(self::$busy[(int)$stream])) {
            self::discard($stream);
        }
    }

    /**
     * Close $stream. One a fork() child inherited is this process's copy of the socket:
     * closing it leaves the parent's connection open (PHP shuts no socket down on close).
     *
     * @param resource $stream
     */
    private static function discard($stream): void
    {
        if (self::isOpen($stream)) {  // another holder may have closed it already
            @fclose($stream);
        }
        unset(self::$owners[(int)$stream]);
    }

    /** @param resource $stream a stream, or what is left of one after fclose() */
    private static function isOpen($stream): bool
    {
        return is_resource($stream)
            && in_array(get_resource_type($stream), ['stream', 'persistent stream'], true);
    }

    /**
     * Write $data; $total counts the bytes written before the stream failed (all of them:
     * strlen($data)), kept up to date when a timeout throws.
     *
     * @param resource $stream
     *
     * @throws TimeoutException the service did not take them within the stream's timeout
     */
    private function write($stream, string $data, int &$total): void
    {
        while ($total < strlen($data)) {
            $written = @fwrite($stream, substr($data, $total));
            if ($written === false || $written === 0) {
                if (!empty(stream_get_meta_data($stream)['timed_out'])) {
                    throw new TimeoutException("the service at {$this->address} took no request in time");
                }
                break;
            }
            $total += $written;
        }
    }

    /**
     * readExact() once the request is written: a lost connection then means the request
     * may have run, and it is not sent again; so does a timeout (its wasSent()).
     *
     * @param resource $stream
     */
    private function readReply($stream, int $length): string
    {
        try {
            return $this->readExact($stream, $length);
        } catch (TimeoutException) {
            throw TimeoutException::noReply($this->address);
        } catch (ServiceDownException $e) {
            throw new ServiceDownException(
                "connection to {$this->address} lost before the reply: the request may have run",
                0,
                $e,
            );
        }
    }

    /**
     * $length bytes of $stream, read READ_CHUNK at most at a time: fread() reserves the
     * length it is asked for, so asking for the whole rest of a long reply at each read
     * held that much memory however little had come.
     *
     * @param resource $stream
     */
    private function readExact($stream, int $length): string
    {
        $data = '';
        while (strlen($data) < $length) {
            $chunk = @fread($stream, min($length - strlen($data), self::READ_CHUNK));
            if ($chunk === false || $chunk === '') {
                if (!empty(stream_get_meta_data($stream)['timed_out'])) {
                    throw new TimeoutException("no reply from {$this->address} in time");
                }
                if ($chunk === false || feof($stream)) {
                    throw new ServiceDownException("connection to {$this->address} closed");
                }
            }
            $data .= $chunk;
        }
        return $data;
    }
}
