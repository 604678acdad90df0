<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use PHPUnit\Framework\TestCase;

/**
 * Tests against a real, running service, whose host:port is in BGSERVICE_TEST_ADDRESS
 * (tests/test_php_package.py starts one and sets it). Without it they are skipped, so that
 * the pure tests still run anywhere.
 */
abstract class ServiceTestCase extends TestCase
{
    protected static function address(): string
    {
        $address = getenv('BGSERVICE_TEST_ADDRESS');
        if ($address === false || $address === '') {
            self::markTestSkipped('BGSERVICE_TEST_ADDRESS is not set: no service to talk to');
        }
        return $address;
    }

    /** A client of its own: not persistent, so that no test inherits another's connection. */
    protected static function client(float $timeout = 10.0): Client
    {
        return new Client(self::address(), $timeout, null, false);
    }

    /** host:port where nothing listens: a port the kernel gave us, then closed. */
    protected static function deadAddress(): string
    {
        $server = stream_socket_server('tcp://127.0.0.1:0');
        self::assertIsResource($server);
        $address = (string)stream_socket_get_name($server, false);
        fclose($server);
        return $address;
    }
}
