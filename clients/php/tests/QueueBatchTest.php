<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Exception\BatchException;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyException;

/** One round trip per job (run) and many jobs per write (addMany, getMany). */
final class QueueBatchTest extends ServiceTestCase
{
    public function testRunQueuesAJobAndRepliesItsResult(): void
    {
        $bg = self::client();
        self::assertSame('slept 50', $bg->run('sleep', '50', ['priority' => 3]));
        $done = $bg->request('queue:list?state=done');
        self::assertStringContainsString('"priority":3', $done);  // stored, as any job
        try {
            $bg->run('fail', 'x');
            self::fail('the job failed, run() returned');
        } catch (ReplyException $e) {
            self::assertGreaterThanOrEqual(400, $e->getCode());
        }
    }

    public function testAddManyThenGetManyKeepTheOrder(): void
    {
        $bg = self::client();
        $jobs = [];
        for ($i = 0; $i < 150; $i++) {
            $jobs[] = ['echo', "job $i"];
        }
        $jobs[] = ['sleep', '10', ['priority' => 4]];
        $ids = $bg->addMany($jobs);
        self::assertCount(151, array_unique($ids));
        $sorted = $ids;
        sort($sorted);
        self::assertSame($sorted, $ids);
        $results = $bg->getMany(array_map(fn (int $id): string => "id:$id", $ids));
        self::assertSame('job 0', $results[0]);
        self::assertSame('job 149', $results[149]);
        self::assertSame('slept 10', $results[150]);
        self::assertSame(4, $bg->status($ids[150])['priority']);
    }

    public function testARefusedJobLeavesTheOthersQueued(): void
    {
        $bg = self::client();
        try {
            $bg->addMany([['echo', 'a'], ['echo', 'b', ['priority' => 'high']], ['echo', 'c']]);
            self::fail('a refused job did not throw');
        } catch (BatchException $e) {
            self::assertSame(400, $e->getCode());
            [$first, $refused, $third] = $e->getResults();
            self::assertInstanceOf(ReplyException::class, $refused);
            self::assertIsInt($first);
            self::assertIsInt($third);
            self::assertSame(['a', 'c'], $bg->getMany([$first, $third]));
        }
        $this->expectException(InvalidArgumentException::class);
        $bg->addMany([['echo', 'x', ['colour' => 'red']]]);  // checked before anything is sent
    }

    public function testNamesAndTags(): void
    {
        $bg = self::client();
        $id = $bg->add('echo', 'x', ['name' => 'php invoices', 'tags' => ['billing', 'eu']]);
        $status = $bg->status($id);
        self::assertSame('php invoices', $status['name']);
        self::assertSame(['billing', 'eu'], $status['tags']);
    }
}
