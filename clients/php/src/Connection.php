<?php

declare(strict_types=1);

namespace Bgservice\Client;

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

    /** @var resource|null */
    private $stream = null;

    /**
     * @param string $address    "host:port" (TCP) or "unix:///path" (Unix stream socket)
     * @param float  $timeout    seconds to wait for a reply
     * @param bool   $persistent keep the stream across requests of a PHP-FPM worker
     */
    public function __construct(
        private readonly string $address,
        private readonly float $timeout,
        private readonly bool $persistent,
    ) {
    }

    public function __destruct()
    {
        if (!$this->persistent) {
            $this->close();
        }
    }

    public function close(): void
    {
        if ($this->stream !== null) {
            @fclose($this->stream);
            $this->stream = null;
        }
    }

    /**
     * Send one request and read its reply.
     *
     * @throws ServiceDownException the service cannot be reached or the stream broke
     * @throws TimeoutException     no reply within $timeout (default: the constructor's)
     */
    public function request(string $payload, ?float $timeout = null): Reply
    {
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
     */
    public function requests(array $payloads, ?float $timeout = null): array
    {
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
     * Write $frames and read $count replies. A kept stream the service had closed
     * meanwhile (idle timeout, restart) is reopened once: nothing can have run on it.
     *
     * @return list<Reply>
     */
    private function exchange(string $frames, int $count, ?float $timeout): array
    {
        $timeout ??= $this->timeout;
        for ($attempt = 1; $attempt <= 2; $attempt++) {
            $reused = $this->stream !== null;
            $stream = $this->connect();
            stream_set_timeout($stream, (int)$timeout, (int)(fmod($timeout, 1) * 1e6));
            try {
                $this->writeAll($stream, $frames);
                $replies = [];
                for ($i = 0; $i < $count; $i++) {
                    $head = $this->readExact($stream, 7);
                    /** @var array{1: int} $size readExact gave 7 bytes, so unpack cannot fail */
                    $size = unpack('N', $head, 3);
                    $body = $size[1] > 0 ? $this->readExact($stream, $size[1]) : '';
                    $replies[] = new Reply((int)substr($head, 0, 3), $body);
                }
                return $replies;
            } catch (TimeoutException $e) {
                $this->close();  // a late reply would be read as the next request's
                throw $e;
            } catch (ServiceDownException $e) {
                $this->close();
                if (!$reused) {
                    throw $e;
                }
            }
        }
        throw new ServiceDownException("connection to {$this->address} lost");
    }

    /** @return resource */
    private function connect()
    {
        if ($this->stream !== null) {
            return $this->stream;
        }
        $target = str_contains($this->address, '://') ? $this->address : 'tcp://' . $this->address;
        $flags = STREAM_CLIENT_CONNECT | ($this->persistent ? STREAM_CLIENT_PERSISTENT : 0);
        $stream = @stream_socket_client($target, $errno, $errstr, min($this->timeout, 5.0), $flags);
        if ($stream === false) {
            throw new ServiceDownException("cannot reach the service at {$this->address}: $errstr");
        }
        // A persistent stream may have spoken the preface in an earlier request of this
        // PHP-FPM worker: its position is then past it.
        if (!$this->persistent || ftell($stream) === 0) {
            stream_set_timeout($stream, 5);
            try {
                $this->writeAll($stream, self::PREFACE);
                $echoed = $this->readExact($stream, strlen(self::PREFACE));
            } catch (ServiceDownException | TimeoutException $e) {
                @fclose($stream);
                throw new ServiceDownException("{$this->address}: no framed-protocol greeting", 0, $e);
            }
            if ($echoed !== self::PREFACE) {
                @fclose($stream);
                throw new ServiceDownException("{$this->address} does not speak the framed protocol");
            }
        }
        $this->stream = $stream;
        return $stream;
    }

    /** @param resource $stream */
    private function writeAll($stream, string $data): void
    {
        while ($data !== '') {
            $written = @fwrite($stream, $data);
            if ($written === false || $written === 0) {
                throw new ServiceDownException("connection to {$this->address} lost while writing");
            }
            $data = substr($data, $written);
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
