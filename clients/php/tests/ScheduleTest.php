<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Exception\ReplyException;

/** Recurring jobs through the PHP client against a real service. */
final class ScheduleTest extends ServiceTestCase
{
    public function testAddPauseFireAndRemoveASchedule(): void
    {
        $bg = self::client();
        $made = null;
        for ($i = 0; $i < 100 && $made === null; $i++) {  // 503 for a moment after the start
            try {
                $made = $bg->schedule('php-nightly', 'echo', 'from php',
                    ['cron' => '0 3 * * *', 'tz' => 'Europe/Berlin', 'priority' => 2]);
            } catch (ReplyException $e) {
                self::assertSame(503, $e->getCode());
                usleep(50_000);
            }
        }
        self::assertIsArray($made);
        self::assertSame('0 3 * * *', $made['cron']);
        self::assertSame(['priority' => '2'], $made['options']);
        self::assertGreaterThan(microtime(true), $made['next_run']);
        self::assertTrue($bg->pause('php-nightly')['paused']);
        self::assertFalse($bg->resume('php-nightly')['paused']);
        self::assertSame('from php', $bg->get($bg->fire('php-nightly')));
        self::assertContains('php-nightly', array_column($bg->schedules(), 'name'));
        $bg->unschedule('php-nightly');
        self::assertNotContains('php-nightly', array_column($bg->schedules(), 'name'));
        try {
            $bg->schedule('bad', 'echo', '', ['every' => 0]);
            self::fail('every = 0 was taken');
        } catch (ReplyException $e) {
            self::assertSame(400, $e->getCode());
        }
    }
}
