<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ClientException;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;
use PHPUnit\Framework\Attributes\DataProvider;

/**
 * Calls, sends and their failures, against a real service. Each data provider is named by
 * annotation (PHPUnit 9) and by attribute (PHPUnit 10+), as in JobIdTest.
 */
final class ClientTest extends ServiceTestCase
{
    public function testCallsGoOverOneKeptConnection(): void
    {
        $bg = self::client();
        $before = $bg->stats()['connections']['total'];
        self::assertSame('Test', $bg->call('test', 'x'));
        self::assertSame("binary\0safe:with:colons", $bg->call('echo', "binary\0safe:with:colons"));
        self::assertSame(2_000_000, strlen($bg->call('echo', str_repeat('x', 2_000_000))));
        self::assertTrue($bg->ping());
        self::assertSame($before, $bg->stats()['connections']['total']);
    }

    public function testAnErrorReplyIsAReplyExceptionWithItsCode(): void
    {
        $bg = self::client();
        try {
            $bg->call('nosuch', 'x');
            self::fail('no exception');
        } catch (ReplyException $e) {
            self::assertSame([400, 'Unknown request'], [$e->getCode(), $e->getMessage()]);
            self::assertInstanceOf(ServiceException::class, $e);
            self::assertInstanceOf(ClientException::class, $e);
        }
        self::assertSame('Test', $bg->call('test'));  // the connection goes on
    }

    public function testATimeoutDropsTheConnectionAndTheNextCallWorks(): void
    {
        $bg = self::client();
        self::assertSame('Test', $bg->call('test'));  // connected: only the call races 0.3 s
        try {
            $bg->call('sleep', '3000', 0.3);
            self::fail('no timeout');
        } catch (TimeoutException $e) {
            self::assertStringContainsString('no reply', $e->getMessage());
        }
        self::assertSame('Test', $bg->call('test'));  // not the late "slept 3000"
    }

    public function testAServiceThatIsDownIsItsOwnExceptionAndSendNeverThrows(): void
    {
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        try {
            $bg->call('less', 'a {}');
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            self::assertStringContainsString('cannot reach the service', $e->getMessage());
        }
        $bg->send('log', 'nobody listens');  // UDP cannot know; it must just not throw
        $this->addToAssertionCount(1);
    }

    public function testSendOverUdp(): void
    {
        self::assertTrue(self::client()->send('test', 'fire and forget'));
    }

    public function testSendWithAUnixStreamAddressNeedsADatagramAddress(): void
    {
        // It once connected a stream to the stream socket: the datagram handler never ran.
        $bg = new Client('unix:///nonexistent/bg.sock', 1.0, null, false);
        $this->expectException(InvalidArgumentException::class);
        $bg->send('log', 'lost before');
    }

    public function testAPersistentConnectionIsSharedByTheClientsOfOneProcess(): void
    {
        // As under PHP-FPM: a new object per request, one connection per worker.
        $first = new Client(self::address());
        $total = $first->stats()['connections']['total'];
        $second = new Client(self::address());
        self::assertSame($total, $second->stats()['connections']['total']);
        $second->close();
    }

    /** @return iterable<string, array{float}> */
    public static function badTimeouts(): iterable
    {
        yield 'negative: it waited for ever' => [-1.0];
        yield 'zero' => [0.0];
        yield 'INF: it timed out at once' => [INF];
        yield '-INF' => [-INF];
        yield "NAN: PHP's own \\ValueError, no ClientException" => [NAN];
        yield 'past PHP_INT_MAX seconds: (int) made it negative' => [1e19];
        yield 'more than a week' => [7 * 24 * 3600.0 + 1];
    }

    /**
     * @dataProvider badTimeouts
     */
    #[DataProvider('badTimeouts')]
    public function testATimeoutThatIsNotOneIsRefusedByTheConstructor(float $timeout): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage('timeout must be more than 0');
        new Client(self::deadAddress(), $timeout, null, false);
    }

    /**
     * @dataProvider badTimeouts
     */
    #[DataProvider('badTimeouts')]
    public function testATimeoutThatIsNotOneIsRefusedByEveryCallBeforeAnythingIsSent(float $timeout): void
    {
        // Nothing listens there: had anything been sent, this would be ServiceDownException.
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        $calls = [
            'call' => fn () => $bg->call('test', 'x', $timeout),
            'run' => fn () => $bg->run('echo', 'x', [], $timeout),
            'get' => fn () => $bg->get(1, $timeout),
            'getMany' => fn () => $bg->getMany([1, 2], $timeout),
            'request' => fn () => $bg->request('service:ping', $timeout),
        ];
        foreach ($calls as $method => $call) {
            try {
                $call();
                self::fail("$method took a timeout of " . var_export($timeout, true));
            } catch (InvalidArgumentException $e) {
                self::assertStringContainsString('timeout must be more than 0', $e->getMessage());
            }
        }
    }

    public function testTheLongestTimeoutIsAWeekAsInPython(): void
    {
        $bg = new Client(self::address(), 7 * 24 * 3600.0, null, false);
        self::assertSame('Test', $bg->call('test', 'x', 7 * 24 * 3600.0));
    }

    /** @return iterable<string, array{callable(int, int): (int|string|list<int|string>)}> */
    public static function severalIds(): iterable
    {
        yield 'in one string, as the old one-file client passed them' => [fn (int $a, int $b) => "$a,$b"];
        yield "in one string, in the original's form with blanks" => [fn (int $a, int $b) => " id:$a , id:$b\n"];
        yield 'a list' => [fn (int $a, int $b) => [$a, $b]];
        yield 'a list in both forms' => [fn (int $a, int $b) => ["id:$a", (string)$b]];
    }

    /**
     * @dataProvider severalIds
     *
     * @param callable(int, int): (int|string|list<int|string>) $after
     */
    #[DataProvider('severalIds')]
    public function testAfterSeveralJobsWaitsForAllOfThem(callable $after): void
    {
        // It threw (a string) or was refused by the service (a list: after[0]=...).
        $bg = self::client();
        $quick = $bg->add('echo', 'quick');
        $slow = $bg->add('sleep', '1500');
        $last = $bg->add('echo', 'after both', ['after' => $after($quick, $slow)]);
        self::assertSame([$quick, $slow], $bg->status($last)['after']);
        self::assertSame('quick', $bg->get($quick));
        self::assertSame('waiting', $bg->status($last)['state']);  // the slow one still runs
        self::assertSame('after both', $bg->get($last));
        self::assertSame(2, $bg->check($slow));
    }

    /** @return iterable<string, array{int|string|list<mixed>, string}> */
    public static function badAfters(): iterable
    {
        yield 'a bad id in a string' => ['7,id:oops', "'id:oops'"];
        yield 'an empty one in a string' => ['7,', "''"];
        yield 'a bad id in a list' => [[7, 'id:oops'], "'id:oops'"];
        yield 'several in one id of a list' => [[7, '8,9'], "'8,9'"];
        yield 'zero in a list' => [[7, 0], 'not 0'];
        yield 'a float in a list' => [[7, 8.0], 'not float'];
        yield 'an empty list' => [[], 'no job id'];
    }

    /**
     * @dataProvider badAfters
     *
     * @param int|string|list<mixed> $after
     */
    #[DataProvider('badAfters')]
    public function testABadIdAfterFailsBeforeAnythingIsSent(int|string|array $after, string $named): void
    {
        // Nothing listens there: had the job been sent, this would be ServiceDownException.
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage($named);
        $bg->add('echo', 'x', ['after' => $after]);
    }

    public function testARefusalAtConnectIsWhatTheServiceSaid(): void
    {
        // The service writes "403: Forbidden" (allow list) or "503: Too many connections"
        // at once, in the one-shot form, and closes; the client read its first 4 bytes
        // as a wrong greeting: "does not speak the framed protocol", a ServiceDown
        // without the reason.
        $forbidden = new FakeServer('403');
        try {
            (new Client($forbidden->address(), 5.0, null, false))->call('echo', 'x');
            self::fail('no exception');
        } catch (ReplyException $e) {  // this client is refused: no fallback hides it
            self::assertSame(403, $e->getCode());
            self::assertStringContainsString('refused the connection: 403 Forbidden', $e->getMessage());
        }
        $forbidden->stop();
        $full = new FakeServer('503');
        try {
            (new Client($full->address(), 5.0, null, false))->call('echo', 'x');
            self::fail('no exception');
        } catch (ServiceDownException $e) {  // the service cannot serve now: fall back
            self::assertSame(503, $e->getCode());
            self::assertStringContainsString('refused the connection: 503 Too many connections', $e->getMessage());
        }
        $full->stop();
    }
}
