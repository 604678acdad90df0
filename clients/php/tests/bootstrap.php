<?php

/**
 * Loads the client the way a site would: Composer's autoloader when `composer install` ran
 * in clients/php, else the one-file include (which is then tested too).
 */

declare(strict_types=1);

$composer = __DIR__ . '/../vendor/autoload.php';
require is_file($composer) ? $composer : __DIR__ . '/../bgservice.php';

// The base class, before PHPUnit loads the tests that extend it, and the fake server some
// of them start (autoload-dev does the same under Composer, but not under the one-file
// include).
require_once __DIR__ . '/ServiceTestCase.php';
require_once __DIR__ . '/FakeServer.php';
