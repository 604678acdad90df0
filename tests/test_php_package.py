"""clients/php as a PHP developer gets it: its PHPUnit suite run by a real ``phpunit``, and
the package installed by a real ``composer`` into a fresh project, both against a real
service.

Without ``phpunit`` or ``composer`` these tests skip, unless BGSERVICE_TEST_STRICT is set
(as .ci/run sets it): then a missing tool fails them, so CI cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "clients" / "php"

# What a project that uses the package runs: Composer's autoloader, the namespaced client,
# a job id in the original's form, and the old global name that old code still uses.
SITE = r"""<?php
declare(strict_types=1);
require __DIR__ . '/vendor/autoload.php';

use Bgservice\Client\Client;
use Bgservice\Client\Exception\InvalidArgumentException;

$bg = new Client($argv[1]);
$out = [$bg->call('test', 'x')];
$held = $bg->request('queue:add:echo:from composer');   // "id:N", as the original replied
$out[] = $bg->get($held);
try {
    $bg->check('id:oops');
} catch (InvalidArgumentException $e) {
    $out[] = 'refused';
}
$out[] = (new \BackgroundService($argv[1]))->ping();
echo json_encode($out), "\n";
"""


def need(tool: str) -> str:
    """The tool's path; skip without it, or fail when BGSERVICE_TEST_STRICT is set."""
    path = shutil.which(tool)
    if path is None:
        package = "php-cli" if tool == "php" else tool
        message = f"{tool} is not installed (apt-get install {package})"
        if os.environ.get("BGSERVICE_TEST_STRICT"):
            pytest.fail(message + " and BGSERVICE_TEST_STRICT is set")
        pytest.skip(message)
    return path


def address(svc) -> str:
    host, port = svc.tcp
    return f"{host}:{port}"


def test_every_php_file_passes_php_lint():
    """``php -l`` on the library, its shims and its tests: the static check available here
    (PHPStan is not packaged for Debian 12, and packagist.org is out of reach)."""
    php = need("php")
    files = sorted(p for p in PACKAGE.rglob("*.php") if "vendor" not in p.parts)
    assert len(files) >= 15, files
    for path in files:
        done = subprocess.run([php, "-l", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_phpunit_suite_passes_against_a_real_service(service, tmp_path):
    phpunit = need("phpunit")
    report = tmp_path / "junit.xml"
    done = subprocess.run(
        [phpunit, "-c", str(PACKAGE / "phpunit.xml.dist"), "--fail-on-skipped",
         "--fail-on-incomplete", "--log-junit", str(report)],
        cwd=PACKAGE,
        env={**os.environ, "BGSERVICE_TEST_ADDRESS": address(service)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    suite = ElementTree.parse(report).getroot()[0]
    counts = {key: int(suite.get(key) or 0) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 30, counts  # the whole suite ran, not an empty directory
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts


def composer(project: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``composer ARGS`` in ``project``, offline, with a COMPOSER_HOME of the test's own."""
    env = {
        **os.environ,
        "COMPOSER_HOME": str(home),
        "COMPOSER_CACHE_DIR": str(home / "cache"),
        "COMPOSER_ALLOW_SUPERUSER": "1",  # CI runs as root
        "COMPOSER_DISABLE_NETWORK": "1",  # packagist is disabled anyway: prove it
        "COMPOSER_NO_INTERACTION": "1",
    }
    return subprocess.run(
        [need("composer"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_composer_require_from_a_path_repository(service, tmp_path):
    need("composer")
    home, project = tmp_path / "composer-home", tmp_path / "site"
    project.mkdir()
    (project / "composer.json").write_text(
        json.dumps(
            {
                "name": "example/site",
                "repositories": [
                    {"packagist.org": False},
                    # Copied, not symlinked: the project must work from what was installed.
                    {"type": "path", "url": str(PACKAGE), "options": {"symlink": False}},
                ],
            }
        )
    )
    valid = composer(PACKAGE, home, "validate", "--strict", "--no-check-publish")
    assert valid.returncode == 0, valid.stdout + valid.stderr
    done = composer(project, home, "require", "--no-progress", "bgservice/client:*@dev")
    assert done.returncode == 0, done.stdout + done.stderr
    installed = project / "vendor" / "bgservice" / "client"
    assert (installed / "src" / "Client.php").is_file() and not installed.is_symlink()

    (project / "index.php").write_text(SITE)
    run = subprocess.run(
        ["php", str(project / "index.php"), address(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout) == ["Test", "from composer", "refused", True]
