<?php

declare(strict_types=1);

namespace Bgservice\Client;

use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ServiceDownException;
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

    /** @var resource|null */
    private $stream = null;

    /**
     * Streams in the middle of an exchange, closed by a shutdown function if the script
     * ends there: exit() in a signal handler or a fatal error runs no finally block, and
     * a persistent stream left with half a request would take the next request's bytes
     * as the rest of it. (Statics and shutdown functions last one PHP request.)
     *
     * @var array<int, resource>
     */
    private static array $busy = [];

    private static bool $guarded = false;

    /**
     * @param string $address    "host:port" (TCP) or "unix:///path" (Unix stream socket)
     * @param float  $timeout    seconds to wait for a reply, and for a new stream's greeting
     * @param bool   $persistent keep the stream across requests of a PHP-FPM worker
     *
     * @throws InvalidArgumentException $timeout is not a number of seconds > 0, at most MAX_TIMEOUT
     */
    public function __construct(
        private readonly string $address,
        private readonly float $timeout,
        private readonly bool $persistent,
    ) {
        self::checkTimeout($timeout);
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
        if (!$this->persistent) {
            $this->close();
        }
    }

    /** Close the stream now; the next request opens a new one. */
    public function close(): void
    {
        if ($this->stream !== null) {
            if (self::isOpen($this->stream)) {  // another holder may have closed it already
                @fclose($this->stream);
            }
            $this->stream = null;
        }
    }

    /**
     * Send one request and read its reply.
     *
     * @throws ServiceDownException the service cannot be reached or the stream broke
     * @throws TimeoutException     no reply within $timeout (default: the constructor's)
     * @throws InvalidArgumentException $timeout is not one (checkTimeout()): nothing is sent
     */
    public function request(string $payload, ?float $timeout = null): Reply
    {
        $timeout = $timeout === null ? $this->timeout : self::checkTimeout($timeout);
        return $this->exchange(pack('N', strlen($payload)) . $payload, 1, $timeout)[0];
    }

    /**
     * Several requests, pipelined: written WINDOW at a time in one fwrite, then their
     * replies read, so neither side's buffers fill up waiting for the other. The service
     * serves them concurrently and replies in order.
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
        foreach (array_chunk($payloads, self::WINDOW) as $chunk) {
            $frames = '';
            foreach ($chunk as $payload) {
                $frames .= pack('N', strlen($payload)) . $payload;
            }
            array_push($replies, ...$this->exchange($frames, count($chunk), $timeout));
        }
        return $replies;
    }

    /**
     * Write $frames and read $count replies.
     *
     * Never sends a request twice: a kept stream is checked before it is used (open()),
     * and one the service had closed meanwhile (idle timeout, restart) is replaced then,
     * before anything is written. Only a write that the kept stream refuses outright,
     * with not a byte of it accepted, is tried again on a new stream. Once the request is
     * written, losing the connection is a ServiceDownException: the service may have run
     * it, and sending it again could, e.g., queue a job twice.
     *
     * The stream is closed unless every reply was read whole, whatever interrupted the
     * exchange (a timeout, a broken connection, an exception from a signal handler), so
     * that no later request reads this one's reply.
     *
     * @return list<Reply>
     */
    private function exchange(string $frames, int $count, float $timeout): array
    {
        for ($attempt = 1; ; $attempt++) {
            [$stream, $reused] = $this->open(min($timeout, $this->timeout));
            $complete = false;
            self::guard($stream);
            try {
                stream_set_timeout($stream, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
                $written = $this->write($stream, $frames);
                if ($written === 0 && $reused && $attempt === 1) {
                    continue;  // nothing sent on a stale kept stream (finally closes it)
                }
                if ($written < strlen($frames)) {
                    throw new ServiceDownException($written === 0
                        ? "connection to {$this->address} lost before the request was sent"
                        : "connection to {$this->address} lost while sending the request: it may have run");
                }
                $replies = [];
                for ($i = 0; $i < $count; $i++) {
                    $head = $this->readReply($stream, 7);
                    /** @var array{1: int} $size readReply gave 7 bytes, so unpack cannot fail */
                    $size = unpack('N', $head, 3);
                    $body = $size[1] > 0 ? $this->readReply($stream, $size[1]) : '';
                    $replies[] = new Reply((int)substr($head, 0, 3), $body);
                }
                $complete = true;
                return $replies;
            } finally {
                unset(self::$busy[(int)$stream]);
                if (!$complete) {
                    $this->close();  // half-read or half-written: useless to anyone after
                }
            }
        }
    }

    /** @param resource $stream about to be written to, and its replies read */
    private static function guard($stream): void
    {
        self::$busy[(int)$stream] = $stream;
        if (!self::$guarded) {
            self::$guarded = true;
            register_shutdown_function(static function (): void {
                foreach (self::$busy as $busy) {
                    if (self::isOpen($busy)) {
                        @fclose($busy);
                    }
                }
                self::$busy = [];
            });
        }
    }

    /**
     * The kept stream if it is still good, else a new one that has spoken the preface.
     *
     * @param float $timeout seconds to connect (5 at most) and to wait for the greeting
     *
     * @return array{0: resource, 1: bool} the stream, and whether it was kept from before
     *
     * @throws ServiceDownException no connection (refused, unreachable, not in time)
     * @throws TimeoutException     connected, but no greeting within $timeout
     */
    private function open(float $timeout): array
    {
        if ($this->stream !== null) {
            if (self::isIdle($this->stream)) {
                return [$this->stream, true];
            }
            $this->close();
        }
        $stream = $this->dial($timeout);
        // A persistent stream may be one this PHP-FPM worker kept from an earlier request,
        // or that another Client of this process holds: its position is then past the
        // preface. It is as good as the check says: closed meanwhile, or left with bytes
        // to read by a call that did not finish (a request aborted mid-call), it is
        // replaced (for its other holders too, who will see it closed).
        if ($this->persistent && ftell($stream) !== 0) {
            if (self::isIdle($stream)) {
                $this->stream = $stream;
                return [$stream, true];
            }
            @fclose($stream);
            $stream = $this->dial($timeout);
        }
        stream_set_timeout($stream, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
        // Connected: the kernel completes a connect even while the service's loop is
        // blocked (a module's long synchronous call), so a greeting that does not come in
        // time is a busy service, as a late reply is, not a service down.
        try {
            $sent = $this->write($stream, self::PREFACE) === strlen(self::PREFACE);
            $echoed = $sent ? $this->readExact($stream, strlen(self::PREFACE)) : null;
        } catch (TimeoutException $e) {
            @fclose($stream);
            throw new TimeoutException("{$this->address} accepted but did not greet in time", 0, $e);
        } catch (ServiceDownException $e) {
            @fclose($stream);
            throw new ServiceDownException("{$this->address}: no framed-protocol greeting", 0, $e);
        }
        if ($echoed !== self::PREFACE) {
            @fclose($stream);
            throw new ServiceDownException($sent
                ? "{$this->address} does not speak the framed protocol"
                : "{$this->address}: connection lost while sending the preface");
        }
        $this->stream = $stream;
        return [$stream, false];
    }

    /**
     * A connected stream: new, or this process's persistent one for the address.
     *
     * @return resource
     */
    private function dial(float $timeout)
    {
        $target = str_contains($this->address, '://') ? $this->address : 'tcp://' . $this->address;
        $flags = STREAM_CLIENT_CONNECT | ($this->persistent ? STREAM_CLIENT_PERSISTENT : 0);
        $stream = @stream_socket_client($target, $errno, $errstr, min($timeout, 5.0), $flags);
        if ($stream === false) {
            throw new ServiceDownException("cannot reach the service at {$this->address}: $errstr");
        }
        return $stream;
    }

    /**
     * Still open (a persistent stream is shared by the Clients of a process, and any of
     * them may have closed it) and with nothing to read: an idle stream in a good state.
     * Readable means the service closed it (EOF) or bytes were left over from a call that
     * did not finish; either way it is of no use. Checked without waiting.
     *
     * @param resource $stream
     */
    private static function isIdle($stream): bool
    {
        if (!self::isOpen($stream)) {
            return false;
        }
        $read = [$stream];
        $write = $except = null;
        return @stream_select($read, $write, $except, 0) === 0;
    }

    /** @param resource $stream a stream, or what is left of one after fclose() */
    private static function isOpen($stream): bool
    {
        return is_resource($stream)
            && in_array(get_resource_type($stream), ['stream', 'persistent stream'], true);
    }

    /**
     * The bytes of $data written before the stream failed (all of them: strlen($data)).
     *
     * @param resource $stream
     *
     * @throws TimeoutException the service did not take them within the stream's timeout
     */
    private function write($stream, string $data): int
    {
        $total = 0;
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
        return $total;
    }

    /**
     * readExact() once the request is written: a lost connection then means the request
     * may have run, and it is not sent again.
     *
     * @param resource $stream
     */
    private function readReply($stream, int $length): string
    {
        try {
            return $this->readExact($stream, $length);
        } catch (ServiceDownException $e) {
            throw new ServiceDownException(
                "connection to {$this->address} lost before the reply: the request may have run",
                0,
                $e,
            );
        }
    }

    /** @param resource $stream */
    private function readExact($stream, int $length): string
    {
        $data = '';
        while (strlen($data) < $length) {
            $chunk = @fread($stream, $length - strlen($data));
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
