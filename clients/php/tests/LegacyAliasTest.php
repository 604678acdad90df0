<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\ServiceDownException;
use Bgservice\Client\Exception\ServiceException;
use Bgservice\Client\Exception\TimeoutException;

/**
 * Code written for the old one-file client, with its global class names, keeps working.
 *
 * @group legacy
 */
final class LegacyAliasTest extends ServiceTestCase
{
    public function testTheOldNamesAreTheNewClasses(): void
    {
        $pairs = [
            'BackgroundService' => Client::class,
            'BackgroundServiceException' => ServiceException::class,
            'BackgroundServiceDown' => ServiceDownException::class,
            'BackgroundServiceTimeout' => TimeoutException::class,
        ];
        foreach ($pairs as $old => $new) {
            // Declared already, without autoloading: a `catch` does not autoload.
            self::assertTrue(class_exists($old, false), $old);
            self::assertSame($new, (new \ReflectionClass($old))->getName());
        }
    }

    public function testOldCatchBlocksStillCatch(): void
    {
        $bg = new \BackgroundService(self::address(), 10.0, null, false);
        try {
            $bg->call('nosuch');
            self::fail('no exception');
        } catch (\BackgroundServiceException $e) {
            self::assertInstanceOf(ReplyException::class, $e);
            self::assertSame(400, $e->getCode());
        }
        try {
            (new \BackgroundService(self::deadAddress(), 2.0, null, false))->call('test');
            self::fail('no exception');
        } catch (\BackgroundServiceDown $e) {
            $this->addToAssertionCount(1);
        }
        self::assertSame('Test', $bg->call('test'));
    }

    public function testAnOldNameTheSiteDeclaredItselfIsLeftAndTheOthersAliased(): void
    {
        // Only BackgroundService was checked: a site that had declared one of the other
        // names (its own copy of an old exception class) got a warning from class_alias()
        // on every request.
        $script = 'error_reporting(E_ALL);
            class BackgroundServiceException extends RuntimeException {}
            require ' . var_export(__DIR__ . '/../bgservice.php', true) . ';
            echo json_encode([
                (new ReflectionClass("BackgroundService"))->getName(),
                (new ReflectionClass("BackgroundServiceException"))->getName(),
                (new ReflectionClass("BackgroundServiceDown"))->getName(),
                (new ReflectionClass("BackgroundServiceTimeout"))->getName(),
            ]);';
        $output = shell_exec(escapeshellarg(PHP_BINARY) . ' -d display_errors=stdout -r ' . escapeshellarg($script) . ' 2>&1');
        self::assertSame(json_encode([
            Client::class, 'BackgroundServiceException', ServiceDownException::class, TimeoutException::class,
        ]), $output);
    }
}
