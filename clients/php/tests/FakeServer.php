<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use PHPUnit\Framework\Assert;

/**
 * A misbehaving framed-protocol server, for what a real service never does on cue: it
 * runs in a child `php` process (proc_open), one connection at a time, and reports every
 * request it read. Modes, for each connection:
 *
 * - "echo":    greet, reply each request as the echo module does (its data), or
 *              queue:add does ("id:N");
 * - "once":    greet, reply the first request, then close (an idle timeout, early);
 * - "drop":    greet, reply the first request; read the next one and close, no reply;
 * - "partial": greet, reply the first request; read the next one, send part of a reply
 *              and close;
 * - "extra":   greet, reply each request followed by a reply nobody asked for;
 * - "silent":  accept and never greet;
 * - "stall":   greet, reply the first request, then read nothing for 2 s (a large
 *              request's write blocks), then read (unlogged) until the client closes;
 * - "late":    greet, reply the first request; read nothing for 2 s, then the second
 *              request whole, and reply "late" 1 s later and close (a slow call);
 * - "cut":     greet, reply the first WINDOW (64) requests; read the next and close,
 *              no reply (a service killed in the middle of a batch);
 * - "gone":    greet, reply the first WINDOW requests, close, and stop listening (a
 *              service stopped between two writes of a batch);
 * - "huge":    as "echo", but reply "echo:big" with a header that says 3,000,000,000
 *              bytes and 8 KiB of them, then go on reading (a peer that is no bgservice);
 * - "403", "503": write the service's refusal in its one-shot form at once ("403:
 *              Forbidden", "503: Too many connections"), read until the client closes.
 */
final class FakeServer
{
    /** Connection::PREFACE, spelled out: the child process loads nothing but this file. */
    private const PREFACE = "\x00:F1";

    /** The length "huge" says its reply has: more than PHP could hold under any usual
     *  memory_limit, less than the 4 GiB a header can say. */
    public const HUGE = 3_000_000_000;

    /** @var resource */
    private $process;

    /** @var array<int, resource> */
    private array $pipes;

    private string $address;

    public function __construct(string $mode)
    {
        $code = 'require ' . var_export(__FILE__, true) . '; '
            . '\Bgservice\Client\Tests\FakeServer::serve(' . var_export($mode, true) . ');';
        $process = proc_open([PHP_BINARY, '-n', '-r', $code], [['pipe', 'r'], ['pipe', 'w'], STDERR], $pipes);
        Assert::assertIsResource($process);
        $this->process = $process;
        $this->pipes = $pipes;
        $this->address = trim((string)fgets($pipes[1]));
        Assert::assertMatchesRegularExpression('/\A127\.0\.0\.1:[0-9]+\z/', $this->address);
    }

    public function __destruct()
    {
        $this->stop();
    }

    public function address(): string
    {
        return $this->address;
    }

    /**
     * Stop the server; the payloads of the requests it read, in order.
     *
     * @return list<string>
     */
    public function stop(): array
    {
        if (!isset($this->pipes[1])) {
            return [];
        }
        fclose($this->pipes[0]);  // the server's stdin ends: it exits
        $log = (string)stream_get_contents($this->pipes[1]);
        fclose($this->pipes[1]);
        unset($this->pipes[1]);
        proc_close($this->process);
        $lines = array_filter(explode("\n", $log), fn (string $line): bool => $line !== '');
        return array_values(array_map(fn (string $line): string => (string)base64_decode($line, true), $lines));
    }

    /** The child's side: serve until stdin ends (the test, or its process, is gone). */
    public static function serve(string $mode): void
    {
        $server = stream_socket_server('tcp://127.0.0.1:0');
        if ($server === false) {
            exit(1);
        }
        echo stream_socket_get_name($server, false), "\n";
        $held = [];  // "silent": accepted, never answered
        while (true) {
            $read = [$server, STDIN];
            $write = $except = null;
            if (stream_select($read, $write, $except, null) === false || in_array(STDIN, $read, true)) {
                return;  // stdin readable: it ended, as nothing writes to it
            }
            $conn = stream_socket_accept($server);
            if ($conn === false) {
                continue;
            }
            if ($mode === 'silent') {
                $held[] = $conn;
                continue;
            }
            if ($mode === '403' || $mode === '503') {
                fwrite($conn, $mode === '403' ? '403: Forbidden' : '503: Too many connections');
                stream_socket_shutdown($conn, STREAM_SHUT_WR);  // as the service: the end of the reply
                while (self::take($conn, 65536, true) !== null) {
                }
                fclose($conn);
                continue;
            }
            self::converse($conn, $mode);
            fclose($conn);
            if ($mode === 'gone') {
                fclose($server);  // refused from now on
                $read = [STDIN];
                $write = $except = null;
                stream_select($read, $write, $except, null);
                return;
            }
        }
    }

    /** @param resource $conn */
    private static function converse($conn, string $mode): void
    {
        if (self::take($conn, strlen(self::PREFACE)) !== self::PREFACE) {
            return;
        }
        fwrite($conn, self::PREFACE);
        for ($n = 1; ; $n++) {
            $head = self::take($conn, 4);
            if ($head === null) {
                return;
            }
            /** @var array{1: int} $size */
            $size = unpack('N', $head);
            $payload = $size[1] > 0 ? self::take($conn, $size[1]) : '';
            if ($payload === null) {
                return;
            }
            echo base64_encode($payload), "\n";  // logged before any answer, so the test sees it
            if (($n > 1 && $mode === 'drop') || ($n > 64 && $mode === 'cut')) {
                return;
            }
            if ($mode === 'huge' && $payload === 'echo:big') {
                @fwrite($conn, '200' . pack('N', self::HUGE) . str_repeat('x', 8192));
                continue;
            }
            if ($n > 1 && $mode === 'partial') {
                fwrite($conn, '200' . pack('N', 10) . 'abc');
                return;
            }
            $body = str_starts_with($payload, 'queue:add')
                ? "id:$n"                                // as queue:add answers
                : explode(':', $payload, 2)[1] ?? '';   // as the echo module does
            $reply = '200' . pack('N', strlen($body)) . $body;
            fwrite($conn, $mode === 'extra' ? $reply . '200' . pack('N', 5) . 'stale' : $reply);
            if ($mode === 'once' || ($n === 64 && $mode === 'gone')) {
                return;
            }
            if ($mode === 'late') {
                $read = [STDIN];
                $write = $except = null;
                stream_select($read, $write, $except, 2);  // the client's write of the next blocks
                $head = self::take($conn, 4);
                /** @var array{1: int} $size */
                $size = $head === null ? [1 => 0] : unpack('N', $head);
                $next = $head === null ? null : self::take($conn, $size[1]);
                if ($next === null) {
                    return;
                }
                echo base64_encode(strlen($next) > 64 ? substr($next, 0, 10) . '...' : $next), "\n";
                $read = [STDIN];
                stream_select($read, $write, $except, 1);  // its reply is late
                fwrite($conn, '200' . pack('N', 4) . 'late');
                return;
            }
            if ($mode === 'stall') {
                $read = [STDIN];
                $write = $except = null;
                stream_select($read, $write, $except, 2);
                while (self::take($conn, 65536, true) !== null) {
                }
                return;
            }
        }
    }

    /**
     * $length bytes of $conn (fewer if $some), or null if it closed first (or the test
     * went away).
     *
     * @param resource $conn
     */
    private static function take($conn, int $length, bool $some = false): ?string
    {
        $data = '';
        while (strlen($data) < $length) {
            $read = [$conn, STDIN];
            $write = $except = null;
            if (stream_select($read, $write, $except, null) === false || in_array(STDIN, $read, true)) {
                return null;
            }
            $chunk = fread($conn, $length - strlen($data));
            if ($chunk === false || $chunk === '') {
                return null;
            }
            $data .= $chunk;
            if ($some) {
                break;
            }
        }
        return $data;
    }
}
