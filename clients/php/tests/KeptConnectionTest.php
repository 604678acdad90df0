<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;

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
}
