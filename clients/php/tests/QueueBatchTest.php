<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\BatchException;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\ServiceDownException;
use PHPUnit\Framework\Attributes\DataProvider;

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

    public function testABatchCutShortKeepsTheIdsOfTheJobsQueued(): void
    {
        // It threw the ServiceDownException alone: the ids of the 64 jobs queued were
        // lost, and a retry queued them twice.
        $server = new FakeServer('cut');  // replies to 64, reads one more and closes
        $bg = new Client($server->address(), 5.0, null, false);
        $jobs = array_map(fn (int $i): array => ['echo', "job $i"], range(0, 199));
        try {
            $bg->addMany($jobs);
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            $results = $e->getResults();
            self::assertIsArray($results);
            self::assertCount(200, $results);
            self::assertSame(range(1, 64), array_slice($results, 0, 64));  // queued: "id:N"
            foreach (array_slice($results, 64, 64) as $unanswered) {
                self::assertSame($e->getPrevious(), $unanswered);  // sent: may be queued
            }
            self::assertSame(array_fill(0, 72, null), array_slice($results, 128));  // never sent
            self::assertStringContainsString('may have run', $e->getMessage());
            self::assertStringContainsString('64 answered, 64 sent without a reply (they may have run), 72 not sent', $e->getMessage());
        }
        self::assertCount(65, $server->stop());  // and nothing was sent twice
    }

    public function testABatchCutBetweenTwoWritesSaysTheRestWasNotSent(): void
    {
        $server = new FakeServer('gone');  // replies to 64, closes and stops listening
        $bg = new Client($server->address(), 5.0, null, false);
        try {
            $bg->getMany(range(1, 200));
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            $results = $e->getResults();
            self::assertIsArray($results);
            self::assertSame(array_map(fn (int $id): string => "get:id:$id", range(1, 64)), array_slice($results, 0, 64));  // as FakeServer echoes
            // Whether the second write went out before the close was seen is the kernel's
            // race: either it did (no reply: it may have run), or it was never sent.
            $second = array_unique(array_map(fn (mixed $r): string => get_debug_type($r), array_slice($results, 64, 64)));
            self::assertContains($second, [['null'], [ServiceDownException::class]]);
            self::assertSame(array_fill(0, 72, null), array_slice($results, 128));
        }
        $server->stop();
    }

    public function testABatchThatCannotStartHasEveryRequestNotSent(): void
    {
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        try {
            $bg->addMany([['echo', 'a'], ['echo', 'b']]);
            self::fail('no exception');
        } catch (ServiceDownException $e) {
            self::assertSame([null, null], $e->getResults());
            self::assertStringContainsString('cannot reach the service', $e->getMessage());
        }
        self::assertNull((new ServiceDownException('x'))->getResults());  // not a batch
    }

    /** @return iterable<string, array{mixed, string}> */
    public static function malformedJobs(): iterable
    {
        yield 'keys: a PHP warning, then a TypeError' => [['module' => 'echo', 'data' => 'x'], "job 1 must be [module, data, options] (a list of 1 to 3), not an array with keys module, data"];
        yield 'not an array' => ['echo', 'job 1 must be an array [module, data, options], not string'];
        yield 'empty' => [[], 'not an empty array'];
        yield 'a module that is no string' => [[5, 'x'], 'a module name (a string) first, not int'];
        yield 'data that is no string' => [['echo', ['x']], 'data as a string (or an int or float), not array'];
        yield 'options that are no array' => [['echo', 'x', 'priority=5'], 'options as an array, not string'];
        yield 'four items' => [['echo', 'x', [], 'y'], '(a list of 1 to 3)'];
    }

    /**
     * @dataProvider malformedJobs
     */
    #[DataProvider('malformedJobs')]
    public function testAMalformedJobIsRefusedNamedBeforeAnythingIsSent(mixed $job, string $message): void
    {
        // Nothing listens there: had anything been sent, this would be ServiceDownException.
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage($message);
        $bg->addMany([['echo', 'fine'], $job]);
    }

    public function testNumbersAsDataAreSentAsCallTakesThem(): void
    {
        // call('echo', 5) from a file without strict_types sends "5"; addMany() threw a
        // TypeError for the same data.
        $bg = self::client();
        $ids = $bg->addMany([['echo', 5], ['echo', 2.5], ['echo']]);
        self::assertSame(['5', '2.5', ''], $bg->getMany($ids));
    }

    public function testAnIdThatIsNoIdIsRefusedNamedByGetMany(): void
    {
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        $this->expectException(InvalidArgumentException::class);
        $this->expectExceptionMessage("getMany(): id 1 must be N or 'id:N', not null");
        $bg->getMany([1, null]);  // @phpstan-ignore-line: what a caller may pass
    }
}
