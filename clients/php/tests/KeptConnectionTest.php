<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;
use PHPUnit\Framework\Attributes\DataProvider;

/**
 * The kept connection: shared by the persistent Clients of a process, checked before it
 * is reused, replaced when it is no good, and a request never sent twice. Against a real
 * service, or a FakeServer where only a misbehaving one can show it.
 */
final class KeptConnectionTest extends ServiceTestCase
{
    public function testAPersistentStreamClosedByAnotherClientIsReopened(): void
    {
        $a = new Client(self::address(), 10.0);
        $b = new Client(self::address(), 10.0);  // the same persistent stream
        try {
            self::assertSame('a1 b1', $a->call('echo', 'a1') . ' ' . $b->call('echo', 'b1'));
            $a->close();
            self::assertSame('b2', $b->call('echo', 'b2'));  // not a TypeError
            self::assertSame('a2', $a->call('echo', 'a2'));
        } finally {
            $b->close();
        }
    }

    public function testATimeoutOfOneClientDoesNotBreakAnotherOnTheSameStream(): void
    {
        $a = new Client(self::address(), 10.0);
        $b = new Client(self::address(), 10.0);
        try {
            self::assertSame('a1 b1', $a->call('echo', 'a1') . ' ' . $b->call('echo', 'b1'));
            try {
                $a->call('sleep', '1000', 0.3);
                self::fail('no timeout');
            } catch (TimeoutException $e) {
                // $a closed the stream, and $b with it
            }
            self::assertSame('b2', $b->call('echo', 'b2'));
        } finally {
            $b->close();
        }
    }

    public function testARequestTheServiceReadIsNotSentAgainWhenItCloses(): void
    {
        $server = new FakeServer('drop');  // reads the second request, closes
        $bg = new Client($server->address(), 5.0, null, false);
        self::assertSame('first', $bg->call('echo', 'first'));
        try {
            $bg->add('thumbnail', 'img1');
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            self::assertStringContainsString('may have run', $e->getMessage());
        }
        self::assertSame(['echo:first', 'queue:add:thumbnail:img1'], $server->stop());  // once
    }

    public function testARequestAnsweredInPartIsNotSentAgain(): void
    {
        $server = new FakeServer('partial');  // part of the second reply, then closes
        $bg = new Client($server->address(), 5.0, null, false);
        self::assertSame('first', $bg->call('echo', 'first'));
        try {
            $bg->call('echo', 'second');
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            self::assertStringContainsString('may have run', $e->getMessage());
        }
        self::assertSame(['echo:first', 'echo:second'], $server->stop());
    }

    public function testAKeptStreamTheServiceClosedWhileIdleIsReplacedBeforeSending(): void
    {
        $server = new FakeServer('once');  // closes each connection after one reply
        $bg = new Client($server->address(), 5.0, null, false);
        self::assertSame('first', $bg->call('echo', 'first'));
        usleep(100_000);  // its close has arrived, as an idle timeout's has
        self::assertSame('second', $bg->call('echo', 'second'));
        self::assertSame(['echo:first', 'echo:second'], $server->stop());
    }

    public function testLeftoverBytesOnAKeptStreamAreNeverReadAsTheNextReply(): void
    {
        $server = new FakeServer('extra');  // each reply followed by one nobody asked for
        $bg = new Client($server->address(), 5.0, null, false);
        self::assertSame('first', $bg->call('echo', 'first'));
        usleep(100_000);
        self::assertSame('second', $bg->call('echo', 'second'));
        self::assertSame(['echo:first', 'echo:second'], $server->stop());
    }

    public function testAPersistentStreamLeftWithBytesIsReplacedForTheNextClient(): void
    {
        // As the next request of a PHP-FPM worker whose previous one left the reply
        // stream with bytes unread: a new Client is handed the same persistent stream.
        $server = new FakeServer('extra');
        $first = new Client($server->address(), 5.0);
        self::assertSame('first', $first->call('echo', 'first'));
        unset($first);  // persistent: the stream stays open, with the extra reply in it
        usleep(100_000);
        $next = new Client($server->address(), 5.0);
        try {
            self::assertSame('second', $next->call('echo', 'second'));
        } finally {
            $next->close();
        }
        self::assertSame(['echo:first', 'echo:second'], $server->stop());
    }

    public function testANewConnectionWaitsForTheGreetingNoLongerThanTheTimeout(): void
    {
        $server = new FakeServer('silent');  // accepts, never greets
        $bg = new Client($server->address(), 0.5, null, false);
        $start = microtime(true);
        try {
            $bg->call('echo', 'x');
            self::fail('no exception');
        } catch (TimeoutException $e) {  // a busy service, not one that is down
            self::assertLessThan(2.0, microtime(true) - $start);  // not 5 s
        }
        $server->stop();
    }

    public function testACallInterruptedMidReplyLeavesNothingForTheNextClient(): void
    {
        if (!function_exists('pcntl_async_signals')) {
            self::markTestSkipped('needs the pcntl extension, to interrupt a call');
        }
        // An exception thrown from a signal handler stands in for a PHP-FPM request
        // aborted mid-call; the next request of the worker gets the same persistent stream.
        $bg = new Client(self::address(), 5.0);
        self::assertSame('warm-up', $bg->call('echo', 'warm-up'));
        $async = pcntl_async_signals(true);
        pcntl_signal(SIGALRM, function (): void {
            throw new \RuntimeException('aborted');
        });
        try {
            pcntl_alarm(1);
            $bg->call('sleep', '1200');
            self::fail('not interrupted');
        } catch (\RuntimeException $e) {
            self::assertSame('aborted', $e->getMessage());
            self::assertNotInstanceOf(ServiceException::class, $e);
        } finally {
            pcntl_alarm(0);
            pcntl_signal(SIGALRM, SIG_DFL);
            pcntl_async_signals($async);
        }
        unset($bg);
        usleep(400_000);  // the interrupted call's reply has come by now
        $next = new Client(self::address(), 5.0);
        try {
            self::assertSame('user 42', $next->call('echo', 'user 42'));
            self::assertSame('second', $next->call('echo', 'second'));
        } finally {
            $next->close();
        }
    }

    public function testAScriptEndedMidRequestLeavesNoHalfRequestOnThePersistentStream(): void
    {
        if (!function_exists('pcntl_async_signals')) {
            self::markTestSkipped('needs the pcntl extension, to end a script mid-request');
        }
        // exit() from a signal handler while a large request is being written (a fatal
        // error does the same): no finally runs. The script's next Client, in a shutdown
        // function as in the next request of a PHP-FPM worker, gets the persistent stream.
        $server = new FakeServer('stall');  // takes none of the large request for 2 s
        $script = 'require ' . var_export(__DIR__ . '/../bgservice.php', true) . ';
            $address = ' . var_export($server->address(), true) . ';
            $bg = new \Bgservice\Client\Client($address, 5.0);
            $bg->call("echo", "first");
            register_shutdown_function(function () use ($address): void {
                $next = new \Bgservice\Client\Client($address, 5.0);
                try {
                    echo $next->call("echo", "next");
                } catch (\Throwable $e) {
                    echo get_class($e);
                }
            });
            pcntl_async_signals(true);
            pcntl_signal(SIGALRM, function (): void {
                exit(0);
            });
            pcntl_alarm(1);
            $bg->call("echo", str_repeat("x", 16 << 20));';
        $output = shell_exec(escapeshellarg(PHP_BINARY) . ' -r ' . escapeshellarg($script));
        self::assertSame('next', $output);  // on a new stream: not a TimeoutException
        self::assertSame(['echo:first', 'echo:next'], $server->stop());
    }

    /**
     * A call cut after its request was written, by exit() or a fatal error (no finally
     * runs), in a script whose shutdown function, registered before any call and so run
     * before the library's own, calls again: on the same Client, or a new one that gets
     * the same persistent stream. It was handed the stream, whose late reply it read as
     * its own.
     *
     * @return array<string, array{0: string, 1: bool, 2: string}>
     */
    public static function interruptions(): array
    {
        return [
            'same client, persistent, exit()' => ['same', true, 'exit'],
            'same client, not persistent, exit()' => ['same', false, 'exit'],
            'new client, persistent, exit()' => ['new', true, 'exit'],
            'same client, persistent, fatal error' => ['same', true, 'fatal'],
        ];
    }

    /**
     * @dataProvider interruptions
     */
    #[DataProvider('interruptions')]
    public function testAStreamWhoseCallDidNotFinishIsNeverUsedAgain(string $next, bool $persistent, string $end): void
    {
        if (!function_exists('pcntl_async_signals')) {
            self::markTestSkipped('needs the pcntl extension, to end a script mid-call');
        }
        $server = new FakeServer('late');  // takes the large request after 2 s, replies "late" 1 s on
        $script = 'require ' . var_export(__DIR__ . '/../bgservice.php', true) . ';
            $address = ' . var_export($server->address(), true) . ';
            $persistent = ' . var_export($persistent, true) . ';
            $bg = new \Bgservice\Client\Client($address, 5.0, null, $persistent);
            register_shutdown_function(function () use ($bg, $address, $persistent): void {
                $next = ' . ($next === 'same' ? '$bg' : 'new \Bgservice\Client\Client($address, 5.0, null, $persistent)') . ';
                try {
                    echo $next->call("echo", "next");
                } catch (\Throwable $e) {
                    echo get_class($e), ": ", $e->getMessage();
                }
            });
            $bg->call("echo", "first");
            pcntl_async_signals(true);
            pcntl_signal(SIGALRM, function (): void {
                ' . ($end === 'fatal' ? 'trigger_error("ended", E_USER_ERROR);' : 'exit(0);') . '
            });
            pcntl_alarm(1);
            $bg->call("echo", str_repeat("x", 16 << 20));';
        $output = shell_exec(escapeshellarg(PHP_BINARY) . ' -d display_errors=stderr -r ' . escapeshellarg($script) . ' 2>/dev/null');
        self::assertSame('next', $output);  // not "late", the cut call's reply
        self::assertSame(['echo:first', 'echo:xxxxx...', 'echo:next'], $server->stop());
    }

    /**
     * The same, across PHP requests of one process (the built-in web server's, as a
     * PHP-FPM worker's): the first request ends mid-call, and its shutdown function that
     * calls exit() keeps the library's from closing the persistent stream. The next
     * request is handed that stream, whose late reply is on its way.
     */
    public function testAPersistentStreamLeftMidCallByAnEarlierRequestIsNotReused(): void
    {
        if (!function_exists('pcntl_async_signals')) {
            self::markTestSkipped('needs the pcntl extension, to end a request mid-call');
        }
        $server = new FakeServer('late');
        $dir = sys_get_temp_dir() . '/bgservice-php-' . getmypid() . '-' . bin2hex(random_bytes(4));
        mkdir($dir);
        file_put_contents("$dir/index.php", '<?php
            require ' . var_export(__DIR__ . '/../bgservice.php', true) . ';
            $bg = new \Bgservice\Client\Client(' . var_export($server->address(), true) . ', 5.0);
            if ($_SERVER["REQUEST_URI"] !== "/first") {
                echo $bg->call("echo", "next");
                return;
            }
            register_shutdown_function(function (): void {
                exit(0);  // an application\'s: no later shutdown function runs
            });
            $bg->call("echo", "first");
            pcntl_async_signals(true);
            pcntl_signal(SIGALRM, function (): void {
                exit(0);
            });
            pcntl_alarm(1);
            $bg->call("echo", str_repeat("x", 16 << 20));');
        file_put_contents("$dir/ready.txt", 'ready');  // served as it is: no PHP runs
        $web = self::deadAddress();
        $process = proc_open([PHP_BINARY, '-S', $web, '-t', $dir], [['pipe', 'r'], ['file', '/dev/null', 'w'], ['file', '/dev/null', 'w']], $pipes);
        self::assertIsResource($process);
        try {
            for ($i = 0; $i < 200 && @file_get_contents("http://$web/ready.txt") !== 'ready'; $i++) {
                usleep(50_000);  // the web server starting
            }
            self::assertSame('', (string)@file_get_contents("http://$web/first"));
            self::assertSame('next', @file_get_contents("http://$web/second"));
            self::assertSame(['echo:first', 'echo:xxxxx...', 'echo:next'], $server->stop());
        } finally {
            proc_terminate($process);
            proc_close($process);
            array_map('unlink', glob("$dir/*") ?: []);
            rmdir($dir);
        }
    }

    /**
     * A fork() child inherits its parent's streams, the persistent one under its key too:
     * a child that talked on them (a new persistent Client, or the parent's own object)
     * shared one connection with its parent, each reading the other's replies.
     */
    public function testAForkedChildOpensConnectionsOfItsOwn(): void
    {
        if (!function_exists('pcntl_fork') || !function_exists('posix_kill')) {
            self::markTestSkipped('needs the pcntl and posix extensions, to fork');
        }
        $script = 'require ' . var_export(__DIR__ . '/../bgservice.php', true) . ';
            $address = ' . var_export(self::address(), true) . ';
            $shared = new \Bgservice\Client\Client($address, 10.0);  // persistent
            $own = new \Bgservice\Client\Client($address, 10.0, null, false);
            $own->ping();
            $before = $shared->stats()["connections"]["total"];  // both open by now
            $children = [];
            for ($k = 0; $k < 3; $k++) {
                $pid = pcntl_fork();
                if ($pid === 0) {
                    $mine = new \Bgservice\Client\Client($address, 10.0);
                    $wrong = 0;
                    for ($i = 0; $i < 100; $i++) {
                        foreach ([$mine, $own, $shared] as $n => $bg) {
                            $wrong += $bg->call("echo", "$k.$n.$i") === "$k.$n.$i" ? 0 : 1;
                        }
                    }
                    // One write (a line under PIPE_BUF): two, and lines of two children
                    // could interleave ("[..][..]\n\n", a CI flake).
                    echo json_encode(["child", $wrong]) . "\n";
                    posix_kill(getmypid(), SIGKILL);  // no shutdown: a worker killed
                }
                $children[] = $pid;
            }
            $wrong = 0;
            for ($i = 0; $i < 100; $i++) {
                $wrong += $shared->call("echo", "p$i") === "p$i" ? 0 : 1;
                $wrong += $own->call("echo", "q$i") === "q$i" ? 0 : 1;
            }
            foreach ($children as $pid) {
                pcntl_waitpid($pid, $status);
            }
            $after = $shared->stats()["connections"]["total"];
            echo json_encode(["parent", $wrong, $after - $before]) . "\n";';
        $output = (string)shell_exec(escapeshellarg(PHP_BINARY) . ' -r ' . escapeshellarg($script) . ' 2>&1');
        $lines = array_map(fn (string $line): mixed => json_decode($line, true), explode("\n", trim($output)));
        sort($lines);
        // Each child opened 2 of its own: its persistent one (its new Client's, and the
        // inherited persistent Client's), and one for the inherited non-persistent Client;
        // and no process read another's reply.
        self::assertSame([['child', 0], ['child', 0], ['child', 0], ['parent', 0, 6]], $lines, $output);
    }
}
