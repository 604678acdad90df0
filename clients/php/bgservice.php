<?php

/**
 * The bgservice PHP client for sites without Composer: require this one file.
 *
 *     require '/path/to/clients/php/bgservice.php';
 *     $bg = new \Bgservice\Client\Client('127.0.0.1:12341');
 *
 * It does what Composer's autoloader does with composer.json: a PSR-4 autoloader for
 * Bgservice\Client\ from src/, and the old global names (BackgroundService, ...) from
 * legacy/aliases.php. Autoloading rather than requiring every file: a class that
 * Composer, or an earlier include of this file, already loaded is never declared twice.
 */

declare(strict_types=1);

spl_autoload_register(static function (string $class): void {
    $prefix = 'Bgservice\\Client\\';
    if (!str_starts_with($class, $prefix)) {
        return;  // not ours: the next autoloader may know it
    }
    $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
    if (is_file($file)) {
        require $file;
    }
});

require_once __DIR__ . '/legacy/aliases.php';
