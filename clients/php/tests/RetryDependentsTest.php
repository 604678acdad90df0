<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Client;
use Bgservice\Client\Exception\ReplyException;

/** retry() with $dependents: the jobs that failed because the job did come back with it. */
final class RetryDependentsTest extends ServiceTestCase
{
    public function testTheJobsThatFailedBecauseOfItComeBackWithItOnlyWhenAsked(): void
    {
        $bg = self::client();
        [$held, $dependent] = self::cancelledPair($bg);
        self::assertSame($held, $bg->retry($held));  // as before: it alone
        self::assertSame('held', $bg->get($held));
        self::assertSame('failed', $bg->status($dependent)['state']);

        [$held, $dependent] = self::cancelledPair($bg);
        self::assertSame($held, $bg->retry("id:$held", true));
        self::assertSame('dependent', $bg->get($dependent));  // after its dependency again
        self::assertSame('held', $bg->get($held));
    }

    /**
     * A job cancelled, and one that failed (424) because of it.
     *
     * @return array{int, int}
     */
    private static function cancelledPair(Client $bg): array
    {
        $held = $bg->add('echo', 'held', ['delay' => 60]);
        $dependent = $bg->add('echo', 'dependent', ['after' => $held]);
        self::assertSame('cancelled', $bg->cancel($held));
        try {
            $bg->get($dependent);  // (it ends as its dependency's cancel reaches it)
            self::fail('the dependent ran');
        } catch (ReplyException $e) {
            self::assertSame([424, "Dependency: job $held cancelled"], [$e->getCode(), $e->getMessage()]);
        }
        return [$held, $dependent];
    }
}
