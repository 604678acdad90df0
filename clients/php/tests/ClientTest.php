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

/** Calls, sends and their failures, against a real service. */
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
}
