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

// Idempotent, name by name: the site may load both Composer's autoloader and
// bgservice.php, or have declared some of the old names itself (its own copy of the old
// one-file client, loaded first): a name taken is left as it is (class_alias() would warn).
foreach ([
    'BackgroundService' => \Bgservice\Client\Client::class,
    'BackgroundServiceException' => \Bgservice\Client\Exception\ServiceException::class,
    'BackgroundServiceDown' => \Bgservice\Client\Exception\ServiceDownException::class,
    'BackgroundServiceTimeout' => \Bgservice\Client\Exception\TimeoutException::class,
] as $bgserviceOldName => $bgserviceClass) {
    if (!class_exists($bgserviceOldName, false)) {
        class_alias($bgserviceClass, $bgserviceOldName);
    }
}
unset($bgserviceOldName, $bgserviceClass);  // a file included at the top level: its variables are the script's

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
