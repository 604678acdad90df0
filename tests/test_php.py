"""The original's PHP clients, unchanged, run by a real ``php`` against the service.

ORIGIN.md: fire-and-forget is ``stream_socket_client('udp://...')`` + ``fwrite``; a call is
``fsockopen`` + ``fputs`` without closing the write side, then one ``fgets($fp, 1024)``,
an error being ``ltrim($reply)`` matching ``/^[45][0-9]{2}\\:/``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import wait_until, write_module

pytestmark = pytest.mark.skipif(shutil.which("php") is None, reason="php-cli not installed")

UDP_CLIENT = r"""<?php
// As the original's README sends a session id: fire and forget, errors suppressed.
$fp = @stream_socket_client('udp://127.0.0.1:' . $argv[1], $errno, $errstr);
if ($fp) {
    stream_set_timeout($fp, 0, 50000);
    @fwrite($fp, 'registersession:' . $argv[2]);
    fclose($fp);
}
echo "sent\n";
"""

TCP_CLIENT = r"""<?php
// As the original's README calls a module: fsockopen, fputs, one fgets, no half-close.
function call($port, $request) {
    $fp = @fsockopen('tcp://127.0.0.1', (int)$port, $errno, $errstr, 2);
    if (!$fp) {
        return array('down', $errstr);
    }
    fputs($fp, $request);
    $reply = fgets($fp, 1024);
    fclose($fp);
    if (preg_match('/^[45][0-9]{2}\:/', ltrim($reply))) {
        return array('error', $reply);
    }
    return array('ok', $reply);
}
list($kind, $reply) = call($argv[1], $argv[2]);
echo $kind, '|', $reply;
"""

QUEUE_CLIENT = r"""<?php
// The original's queue usage: add, check until finished, get.
function call($port, $request) {
    $fp = fsockopen('tcp://127.0.0.1', (int)$port, $errno, $errstr, 2);
    fputs($fp, $request);
    $reply = fgets($fp, 1024);
    fclose($fp);
    return $reply;
}
$port = $argv[1];
$id = call($port, 'queue:add:sleep:300');             // "id:N"
$states = array(call($port, 'queue:check:' . $id));   // 0 waiting or 1 running
while (($state = call($port, 'queue:check:' . $id)) !== '2') {
    $states[] = $state;
    usleep(20000);
}
$states[] = $state;
echo $id, '|', implode(',', array_unique($states)), '|', call($port, 'queue:get:' . $id);
"""

SESSION_MODULE = """
from pathlib import Path

def handle_udp(request):
    with open(Path(__file__).with_name("sessions.log"), "a") as f:
        f.write(request.text + "\\n")
"""


def php(tmp_path, source: str, *args: str) -> str:
    script = tmp_path / "client.php"
    script.write_text(source)
    done = subprocess.run(
        ["php", str(script), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_udp_fire_and_forget_reaches_the_module(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "registersession", SESSION_MODULE)
    svc = make_service()
    port = str(svc.udp[1])
    assert php(tmp_path, UDP_CLIENT, port, "abc123") == "sent\n"
    log = modules_dir / "sessions.log"
    wait_until(lambda: log.exists() and log.read_text() == "abc123\n")


def test_tcp_call_without_half_close(service, tmp_path):
    port = str(service.tcp[1])
    assert php(tmp_path, TCP_CLIENT, port, "test:x") == "ok|Test"
    assert php(tmp_path, TCP_CLIENT, port, "echo:Hello, PHP") == "ok|Hello, PHP"
    assert php(tmp_path, TCP_CLIENT, port, "helo") == "ok|oleh"


def test_errors_match_the_originals_regular_expression(service, tmp_path):
    port = str(service.tcp[1])
    assert php(tmp_path, TCP_CLIENT, port, "nosuchmodule:x") == "error|400: Unknown request"
    assert php(tmp_path, TCP_CLIENT, port, "fail:x") == (
        "error|501: Module fail has no TCP handler"
    )
    kind, reply = php(tmp_path, TCP_CLIENT, port, "sleep:abc").split("|", 1)
    assert kind == "error" and reply.startswith("400:")


def test_service_down_lets_the_client_fall_back(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert php(tmp_path, TCP_CLIENT, port, "test:x").startswith("down|")


def test_the_originals_queue_usage(service, tmp_path):
    job, states, result = php(tmp_path, QUEUE_CLIENT, str(service.tcp[1])).split("|")
    assert job.startswith("id:") and job[3:].isdigit()
    assert states.endswith("2") and set(states.split(",")) <= {"0", "1", "2"}
    assert result == "slept 300"
