<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Connection;
use Bgservice\Client\Exception\InvalidArgumentException;
use PHPUnit\Framework\Attributes\DataProvider;
use PHPUnit\Framework\TestCase;

/**
 * Addresses are checked when the Client is made, against the forms docs/clients.md names
 * (the Python client's too). A wrong one failed only at the first call, and as what the
 * caller's fallback takes for a service down: a ServiceDownException, a TimeoutException
 * after the whole timeout (udp://, udg:// as $address), or a send() that returned false.
 * No service needed: nothing is sent.
 */
final class AddressTest extends TestCase
{
    /** @return iterable<string, array{string, string}> */
    public static function goodAddresses(): iterable
    {
        yield 'host:port' => ['127.0.0.1:12341', 'tcp://127.0.0.1:12341'];
        yield 'a name' => ['bg-1.example.com:80', 'tcp://bg-1.example.com:80'];
        yield 'a fully qualified name' => ['bg-1.example.com.:80', 'tcp://bg-1.example.com.:80'];
        yield '[v6]:port' => ['[::1]:12341', 'tcp://[::1]:12341'];
        yield 'unix:///path' => ['unix:///run/bg.sock', 'unix:///run/bg.sock'];
        yield 'a path, as Python takes it' => ['/run/bg.sock', 'unix:///run/bg.sock'];
        yield 'a relative path' => ['run/bg.sock', 'unix://run/bg.sock'];
        yield 'unix:PATH, as Python takes it' => ['unix:/run/bg.sock', 'unix:///run/bg.sock'];
        yield "tcp://, PHP's own, passed on as it was" => ['tcp://127.0.0.1:12341', 'tcp://127.0.0.1:12341'];
    }

    /**
     * @dataProvider goodAddresses
     */
    #[DataProvider('goodAddresses')]
    public function testTheDocumentedFormsAreTaken(string $address, string $target): void
    {
        self::assertSame($target, Connection::target($address));
        new Client($address, 1.0, null, false);
        $this->addToAssertionCount(1);
    }

    /** @return iterable<string, array{string, string}> */
    public static function badAddresses(): iterable
    {
        yield 'no port' => ['127.0.0.1', "not '127.0.0.1'"];
        yield 'IPv6 without brackets' => ['::1:12341', 'takes brackets'];
        yield 'port 0' => ['127.0.0.1:0', 'host:port'];
        yield 'port too large' => ['127.0.0.1:65536', 'host:port'];
        yield 'no host' => [':12341', 'host:port'];
        yield 'empty' => ['', "not ''"];
        yield 'blanks' => ['127.0.0.1 :12341', 'host:port'];
        yield 'udp:// for calls' => ['udp://127.0.0.1:12341', 'host:port'];
        yield 'udg:// for calls' => ['udg:///run/bg.dgram', 'pass it as $udpAddress'];
        yield 'http://' => ['http://127.0.0.1:12341', 'host:port'];
        yield 'unix:// without a path' => ['unix://', 'no Unix socket path'];
        yield 'unix: without a path' => ['unix:', 'no Unix socket path'];
    }

    /**
     * @dataProvider badAddresses
     */
    #[DataProvider('badAddresses')]
    public function testAnythingElseIsRefusedByTheConstructor(string $address, string $message): void
    {
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage($message);
        new Client($address, 1.0, null, false);
    }

    /** @return iterable<string, array{string, string}> */
    public static function goodDatagramAddresses(): iterable
    {
        yield 'host:port' => ['127.0.0.1:12341', 'udp://127.0.0.1:12341'];
        yield '[v6]:port' => ['[::1]:12341', 'udp://[::1]:12341'];
        yield 'udg:///path' => ['udg:///run/bg.dgram', 'udg:///run/bg.dgram'];
        yield 'a path: it was a stream, and send() went nowhere' => ['/run/bg.dgram', 'udg:///run/bg.dgram'];
        yield 'unix:///path: the same' => ['unix:///run/bg.dgram', 'udg:///run/bg.dgram'];
        yield "udp://, PHP's own" => ['udp://127.0.0.1:12341', 'udp://127.0.0.1:12341'];
    }

    /**
     * @dataProvider goodDatagramAddresses
     */
    #[DataProvider('goodDatagramAddresses')]
    public function testTheDatagramFormsAreTaken(string $address, string $target): void
    {
        self::assertSame($target, Connection::target($address, true));
        new Client('unix:///run/bg.sock', 1.0, $address, false);
        $this->addToAssertionCount(1);
    }

    /** @return iterable<string, array{string}> */
    public static function badDatagramAddresses(): iterable
    {
        yield 'no port' => ['127.0.0.1'];
        yield 'tcp://' => ['tcp://127.0.0.1:12341'];
        yield 'IPv6 without brackets' => ['::1:12341'];
        yield 'udg:// without a path' => ['udg://'];
    }

    /**
     * @dataProvider badDatagramAddresses
     */
    #[DataProvider('badDatagramAddresses')]
    public function testABadDatagramAddressIsRefusedByTheConstructor(string $address): void
    {
        $this->expectException(InvalidArgumentException::class);
        new Client('127.0.0.1:12341', 1.0, $address, false);
    }

    public function testAnEmptyDatagramAddressIsTheDefaultAsInPython(): void
    {
        $bg = new Client('127.0.0.1:1', 1.0, '', false);  // UDP to 127.0.0.1:1: nobody listens
        self::assertIsBool($bg->send('test', 'x'));
    }
}
