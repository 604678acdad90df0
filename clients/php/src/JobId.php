<?php

declare(strict_types=1);

namespace Bgservice\Client;

use Bgservice\Client\Exception\InvalidArgumentException;

/**
 * Job ids as callers hold them: the number (what Client::add() returns) or the string
 * "id:N" that the original service's queue:add replied and its users stored.
 *
 * The old client cast with (int), so "id:7" silently became job 0 and the service
 * answered "404 Job 0 not found"; a typo must instead fail here, naming the value.
 */
final class JobId
{
    /**
     * 7, "7", "id:7" (blanks around N and after "id:" allowed, as the service allows them)
     * -> 7.
     *
     * @throws InvalidArgumentException when $id is not N or "id:N" with 1 <= N <= PHP_INT_MAX
     */
    public static function parse(int|string $id): int
    {
        if (is_int($id)) {
            if ($id < 1) {
                throw self::invalid($id);
            }
            return $id;
        }
        $text = trim($id);
        if (str_starts_with($text, 'id:')) {
            $text = trim(substr($text, 3));
        }
        if (preg_match('/\A[0-9]+\z/', $text) !== 1) {
            throw self::invalid($id);
        }
        $digits = ltrim($text, '0');
        // (int) saturates at PHP_INT_MAX instead of failing, so a number too large shows
        // up as a round trip that does not give the same digits back.
        if ($digits === '' || (string)(int)$digits !== $digits) {
            throw self::invalid($id);
        }
        return (int)$digits;
    }

    /** "id:N", the form the service replies and the original's users kept. */
    public static function format(int|string $id): string
    {
        return 'id:' . self::parse($id);
    }

    private static function invalid(int|string $id): InvalidArgumentException
    {
        // Cut short: the id may come from user input. substr, not mb_*: no extension needed.
        $shown = is_int($id) ? (string)$id
            : var_export(strlen($id) > 40 ? substr($id, 0, 40) . '...' : $id, true);
        return new InvalidArgumentException(
            "job id must be N or 'id:N' with 1 <= N <= " . PHP_INT_MAX . ", not $shown"
        );
    }
}
