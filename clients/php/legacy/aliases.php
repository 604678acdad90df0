<?php

/**
 * The old global class names, kept as aliases so that code written for the one-file,
 * namespace-less client goes on working unchanged. Deprecated: use the namespaced names.
 *
 *     BackgroundService           -> \Bgservice\Client\Client
 *     BackgroundServiceException  -> \Bgservice\Client\Exception\ServiceException
 *     BackgroundServiceDown       -> \Bgservice\Client\Exception\ServiceDownException
 *     BackgroundServiceTimeout    -> \Bgservice\Client\Exception\TimeoutException
 *
 * Declared eagerly (Composer "files" autoload, or bgservice.php), not on first use: PHP
 * does not autoload the class named in a `catch`, so a lazy BackgroundServiceDown would
 * simply never match and the old fallback code would stop catching. Eager also means no
 * runtime deprecation notice (it would fire on every request, used or not); the
 * deprecation is in the stubs below, for IDEs and static analysers.
 */

declare(strict_types=1);

// Idempotent: the site may load both Composer's autoloader and bgservice.php.
if (!class_exists('BackgroundService', false)) {
    class_alias(\Bgservice\Client\Client::class, 'BackgroundService');
    class_alias(\Bgservice\Client\Exception\ServiceException::class, 'BackgroundServiceException');
    class_alias(\Bgservice\Client\Exception\ServiceDownException::class, 'BackgroundServiceDown');
    class_alias(\Bgservice\Client\Exception\TimeoutException::class, 'BackgroundServiceTimeout');
}

// Never runs: tells IDEs and static analysers what the old names are, and that they are
// deprecated.
if (false) {
    /** @deprecated use \Bgservice\Client\Client */
    class BackgroundService extends \Bgservice\Client\Client
    {
    }

    /** @deprecated use \Bgservice\Client\Exception\ServiceException */
    class BackgroundServiceException extends \Bgservice\Client\Exception\ServiceException
    {
    }

    /** @deprecated use \Bgservice\Client\Exception\ServiceDownException */
    class BackgroundServiceDown extends \Bgservice\Client\Exception\ServiceDownException
    {
    }

    /** @deprecated use \Bgservice\Client\Exception\TimeoutException */
    class BackgroundServiceTimeout extends \Bgservice\Client\Exception\TimeoutException
    {
    }
}
