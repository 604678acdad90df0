<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\Exception\ReplyException;
use Bgservice\Client\Exception\TimeoutException;
use PHPUnit\Framework\Attributes\DataProvider;

/** The queue methods against a real service, with job ids in both forms. */
final class QueueTest extends ServiceTestCase
{
    public function testEveryJobMethodTakesTheOriginalsIdN(): void
    {
        $bg = self::client();
        // What a site ported from the original holds: the raw reply of queue:add.
        $held = $bg->request('queue:add:sleep:100');
        self::assertMatchesRegularExpression('/\Aid:[0-9]+\z/', $held);
        $number = (int)substr($held, 3);

        self::assertContains($bg->check($held), [0, 1, 2]);
        self::assertSame($number, $bg->status($held)['id']);
        self::assertSame('slept 100', $bg->get($held));
        self::assertSame(2, $bg->check($held));

        $later = $bg->add('echo', 'after it', ['after' => $held]);
        self::assertSame('after it', $bg->get("id:$later"));

        $waiting = 'id:' . $bg->add('echo', 'x', ['delay' => 30]);
        self::assertSame('cancelled', $bg->cancel($waiting));
        self::assertSame((int)substr($waiting, 3), $bg->retry($waiting));
        self::assertSame('x', $bg->get($waiting));
    }

    public function testAddReturnsANumberTheOtherMethodsTake(): void
    {
        $bg = self::client();
        $first = $bg->add('sleep', '200', ['priority' => 5, 'retries' => 2, 'backoff' => 0.1,
            'timeout' => 10, 'unique' => 'key:with:colons']);
        self::assertSame($first, $bg->add('sleep', '200', ['unique' => 'key:with:colons']));
        $status = $bg->status($first);
        self::assertSame([5, 2, 10.0, 'key:with:colons'],
            [$status['priority'], $status['max_retries'], $status['timeout'], $status['unique']]);
        self::assertSame('slept 200', $bg->get($first));
        self::assertSame('at a time', $bg->get($bg->add('echo', 'at a time', ['at' => microtime(true)])));
    }

    public function testABadIdFailsBeforeAnythingIsSent(): void
    {
        // Nothing listens there: had the id been sent, this would be ServiceDownException.
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        foreach (['get', 'check', 'status', 'cancel', 'retry'] as $method) {
            try {
                $bg->$method('id:oops');
                self::fail("$method took a bad id");
            } catch (InvalidArgumentException $e) {
                self::assertStringContainsString("'id:oops'", $e->getMessage());
            }
        }
        $this->expectException(InvalidArgumentException::class);
        $bg->add('echo', 'x', ['after' => 'id:']);
    }

    public function testATimeoutWaitingForAJobNamesItToFollowItUpLater(): void
    {
        $bg = self::client();
        $slow = $bg->add('sleep', '60000');
        try {
            $bg->get("id:$slow", 0.2);
            self::fail('no timeout');
        } catch (TimeoutException $e) {
            self::assertSame([$slow, true], [$e->getJobId(), $e->wasSent()]);
            self::assertStringEndsWith(": get() gave up waiting for job $slow after get()'s "
                . 'timeout of 0.2 s (the job goes on)', $e->getMessage());
        }
        self::assertContains($bg->check($e->getJobId()), [0, 1]);  // it goes on
        try {
            $bg->run('sleep', '1000', [], 0.2);  // (its id unknown: one that ends soon)
            self::fail('no timeout');
        } catch (TimeoutException $e) {  // no id to name: the reply carries the result only
            self::assertSame([null, true], [$e->getJobId(), $e->wasSent()]);
            self::assertStringContainsString('its job may have been queued', $e->getMessage());
        }
        self::assertContains($bg->cancel($slow), ['cancelled', 'cancelling']);
    }

    public function testAnUnknownOptionIsRefused(): void
    {
        $this->expectException(\InvalidArgumentException::class);  // as the old client threw
        self::client()->add('sleep', '1', ['bogus' => 1]);
    }

    /** @return iterable<string, array{list<mixed>}> */
    public static function badTagLists(): iterable
    {
        yield 'an item with a comma: it went out as two tags' => [['a,b']];
        yield 'an empty item' => [['a', '']];
        yield 'an item of blanks' => [['a', ' ']];
    }

    /**
     * @dataProvider badTagLists
     *
     * @param list<mixed> $tags
     */
    #[DataProvider('badTagLists')]
    public function testATagsItemThatIsNoOneTagIsRefusedBeforeAnythingIsSent(array $tags): void
    {
        // Nothing listens there: had anything been sent, this would be ServiceDownException.
        $bg = new Client(self::deadAddress(), 2.0, null, false);
        $calls = [
            'add' => fn () => $bg->add('echo', 'x', ['tags' => $tags]),
            'run' => fn () => $bg->run('echo', 'x', ['tags' => $tags]),
            'addMany' => fn () => $bg->addMany([['echo', 'x'], ['echo', 'y', ['tags' => $tags]]]),
        ];
        foreach ($calls as $method => $call) {
            try {
                $call();
                self::fail("$method sent tags " . json_encode($tags));
            } catch (InvalidArgumentException $e) {
                self::assertStringStartsWith('each item of option tags must be one tag, not empty and '
                    . 'without a comma', $e->getMessage());
            }
        }
    }

    public function testTagsAsAListOrInOneStringWithCommas(): void
    {
        $bg = self::client();
        $listed = $bg->add('echo', 'x', ['tags' => ['a', 'b.c', 7]]);
        $joined = $bg->add('echo', 'x', ['tags' => 'a,b.c,7']);  // two or more, as on the socket
        self::assertSame(['a', 'b.c', '7'], $bg->status($listed)['tags']);
        self::assertSame(['a', 'b.c', '7'], $bg->status($joined)['tags']);
    }

    public function testAJobThatDoesNotExistOrWasCancelledIsAReplyError(): void
    {
        $bg = self::client();
        try {
            $bg->get(PHP_INT_MAX);
            self::fail('no exception');
        } catch (ReplyException $e) {
            self::assertSame(404, $e->getCode());
        }
        $id = $bg->add('echo', 'x', ['delay' => 30]);
        $bg->cancel($id);
        try {
            $bg->get($id);
            self::fail('no exception');
        } catch (ReplyException $e) {
            self::assertSame(410, $e->getCode());
        }
    }
}
