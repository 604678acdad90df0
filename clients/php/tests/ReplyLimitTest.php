<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\ClientException;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyTooLargeException;
use Bgservice\Client\Exception\ServiceDownException;
use PHPUnit\Framework\Attributes\DataProvider;

/**
 * $maxReplyBytes: the longest reply the client reads. A longer one is a
 * ReplyTooLargeException as soon as its header is read, and its connection is closed.
 * There was no limit: a peer whose header said 3,000,000,000 bytes made PHP reserve that
 * much at the first read, a fatal "Allowed memory size exhausted" no catch could take.
 */
final class ReplyLimitTest extends ServiceTestCase
{
    public function testTheDefaultIsThePythonClients64MiB(): void
    {
        self::assertSame(67_108_864, Client::MAX_REPLY_BYTES);
    }

    /** @return iterable<string, array{int}> */
    public static function badLimits(): iterable
    {
        yield 'zero' => [0];
        yield 'negative' => [-1];
        yield 'PHP_INT_MIN' => [PHP_INT_MIN];
    }

    /**
     * @dataProvider badLimits
     */
    #[DataProvider('badLimits')]
    public function testALimitUnderOneIsRefusedByTheConstructor(int $limit): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("maxReplyBytes must be 1 or more (the longest reply read, in bytes), not $limit");
        new Client(self::deadAddress(), 2.0, null, false, $limit);
    }

    public function testAReplyOfTheLimitIsReadAndOneByteMoreThrowsAndClosesTheConnection(): void
    {
        $bg = new Client(self::address(), 10.0, null, false, 100);
        self::assertSame(str_repeat('x', 100), $bg->call('echo', str_repeat('x', 100)));
        try {
            $bg->call('echo', str_repeat('y', 101));
            self::fail('no exception');
        } catch (ReplyTooLargeException $e) {
            self::assertSame([101, 100], [$e->getSize(), $e->getLimit()]);
            self::assertSame(self::address() . ' sent a reply of 101 bytes, more than maxReplyBytes=100: '
                . 'the connection is closed (the request may have run)', $e->getMessage());
            self::assertInstanceOf(ServiceDownException::class, $e);
            self::assertInstanceOf(ClientException::class, $e);
        }
        self::assertSame('Test', $bg->call('test'));  // a new connection: not the rest of "yyy..."
        self::assertSame(str_repeat('z', 100), $bg->call('echo', str_repeat('z', 100)));
    }

    public function testAReplyOverTheLimitCutsABatchShortKeepingTheRepliesBeforeIt(): void
    {
        $bg = new Client(self::address(), 10.0, null, false, 100);
        [$short, $long, $after] = $bg->addMany([['echo', 'a'], ['echo', str_repeat('b', 200)], ['echo', 'c']]);
        try {
            $bg->getMany([$short, $long, $after]);
            self::fail('no exception');
        } catch (ReplyTooLargeException $e) {
            self::assertSame([200, 100], [$e->getSize(), $e->getLimit()]);  // kept by withResults()
            self::assertStringContainsString('sent a reply of 200 bytes, more than maxReplyBytes=100', $e->getMessage());
            self::assertStringContainsString('a batch of 3 cut short: 1 answered, 2 sent without a reply', $e->getMessage());
            $results = $e->getResults();
            self::assertIsArray($results);
            self::assertSame('a', $results[0]);
            self::assertInstanceOf(ReplyTooLargeException::class, $results[1]);
            self::assertInstanceOf(ReplyTooLargeException::class, $results[2]);
        }
        self::assertSame('c', $bg->get($after));
    }

    public function testAHugeLengthThrowsAtOnceUnder128MAndTheConnectionIsClosed(): void
    {
        $limit = ini_get('memory_limit');
        ini_set('memory_limit', '128M');
        $server = new FakeServer('huge');
        $bg = new Client($server->address(), 5.0);  // persistent, as a site's
        try {
            try {
                $bg->call('echo', 'big');
                self::fail('no exception');
            } catch (ServiceDownException $e) {
                self::assertInstanceOf(ReplyTooLargeException::class, $e);
                self::assertSame([FakeServer::HUGE, Client::MAX_REPLY_BYTES], [$e->getSize(), $e->getLimit()]);
                self::assertSame($server->address() . ' sent a reply of 3000000000 bytes, more than '
                    . 'maxReplyBytes=67108864: the connection is closed (the request may have run)', $e->getMessage());
            }
            // The fake serves one connection at a time: another client is greeted only once
            // the first one's is closed, not merely set aside to be checked at its next call.
            $other = new Client($server->address(), 2.0, null, false);
            self::assertSame('next', $other->call('echo', 'next'));
            $other->close();
            self::assertSame('again', $bg->call('echo', 'again'));  // nothing of the 8 KiB left
        } finally {
            $bg->close();
            ini_set('memory_limit', (string)$limit);
        }
        self::assertSame(['echo:big', 'echo:next', 'echo:again'], $server->stop());  // none sent twice
    }
}
