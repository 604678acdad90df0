<?php

/**
 * @deprecated kept so that `require 'BackgroundService.php'` goes on working; require
 * bgservice.php (or use Composer) and the namespaced classes instead.
 *
 * This file was the whole client, declaring the global classes BackgroundService,
 * BackgroundServiceException, BackgroundServiceDown and BackgroundServiceTimeout. They
 * are now aliases of the classes in src/ (legacy/aliases.php); note that
 * the client is now several files, so copy the whole clients/php folder, not this one.
 */

declare(strict_types=1);

require_once __DIR__ . '/bgservice.php';
