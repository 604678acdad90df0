<?php

declare(strict_types=1);

namespace Bgservice\Client\Tests;

use Bgservice\Client\Exception\ClientException;
use Bgservice\Client\Exception\InvalidArgumentException;
use Bgservice\Client\JobId;
use PHPUnit\Framework\Attributes\DataProvider;
use PHPUnit\Framework\TestCase;

/**
 * JobId alone, no service. Each data provider is named twice, by annotation (PHPUnit 9)
 * and by attribute (PHPUnit 10+), so the tests run on every PHPUnit still in use.
 */
final class JobIdTest extends TestCase
{
    /** @return iterable<string, array{int|string}> */
    public static function sevens(): iterable
    {
        yield 'int' => [7];
        yield 'digits' => ['7'];
        yield "the original's id:N" => ['id:7'];
        yield 'read from a file, with its newline' => [" id:7\n"];
        yield 'a blank after id:, as the service allows' => ['id: 7'];
        yield 'leading zeros' => ['007'];
    }

    /**
     * @dataProvider sevens
     */
    #[DataProvider('sevens')]
    public function testTakesNAndTheOriginalsIdN(int|string $id): void
    {
        self::assertSame(7, JobId::parse($id));
        self::assertSame('id:7', JobId::format($id));
    }

    public function testTheLargestIdPhpCanHold(): void
    {
        self::assertSame(PHP_INT_MAX, JobId::parse('id:' . PHP_INT_MAX));
    }

    /** @return iterable<string, array{int|string}> */
    public static function badIds(): iterable
    {
        yield 'zero' => [0];
        yield 'negative' => [-1];
        yield 'empty' => [''];
        yield 'id: alone' => ['id:'];
        yield 'a word' => ['abc'];
        yield 'id: and a word' => ['id:x'];
        yield 'a decimal' => ['7.0'];
        yield 'an exponent' => ['1e3'];
        yield 'a sign' => ['+7'];
        yield 'a negative string' => ['id:-3'];
        yield 'id: twice' => ['id:id:7'];
        yield 'upper case' => ['ID:7'];
        yield 'a NUL inside' => ["7\x008"];
        yield 'beyond PHP_INT_MAX' => ['9223372036854775808'];
        yield 'far beyond' => [str_repeat('9', 100)];
    }

    /**
     * @dataProvider badIds
     */
    #[DataProvider('badIds')]
    public function testABadIdIsAnExceptionNeverJob0(int|string $id): void
    {
        try {
            JobId::parse($id);
            self::fail('no exception for ' . var_export($id, true));
        } catch (InvalidArgumentException $e) {
            self::assertStringStartsWith("job id must be N or 'id:N'", $e->getMessage());
            // Old code catching the SPL exception, and new code catching the library's
            // marker interface, both catch it.
            self::assertInstanceOf(\InvalidArgumentException::class, $e);
            self::assertInstanceOf(ClientException::class, $e);
        }
    }

    public function testALongBadIdIsCutShortInTheMessage(): void
    {
        $this->expectExceptionMessage(var_export(str_repeat('x', 40) . '...', true));
        JobId::parse(str_repeat('x', 10000));
    }
}
