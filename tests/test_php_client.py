"""clients/php/BackgroundService.php under a real ``php``, against a real service.

On purpose through the deprecated path that existing sites use: ``require
'BackgroundService.php'`` and the old global class names, now aliases of the namespaced
classes (clients/php/legacy/aliases.php). The namespaced API has its own PHPUnit suite,
run by tests/test_php_package.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from bgservice.client import Client, ReplyError
from bgservice.protocol import PREFACE
from tests.conftest import HOG, REPO, wait_until, write_module
from tests.test_client import free_port

pytestmark = pytest.mark.skipif(shutil.which("php") is None, reason="php-cli not installed")

CLIENT = REPO / "clients" / "php" / "BackgroundService.php"

PRELUDE = (
    f"<?php\nrequire '{CLIENT}';\n"
    'function show($v) { echo json_encode($v), "\\n"; }\n'
)


def php(
    tmp_path, body: str, *args: str, timeout: float = 60, ini: tuple[str, ...] = ()
) -> list[str]:
    """Run ``body`` after PRELUDE with ``args``; its lines of output (it must exit 0).
    ``ini``: php.ini settings, ``"memory_limit=128M"``, each given as ``-d``."""
    script = tmp_path / "script.php"
    script.write_text(PRELUDE + body)
    settings = [arg for setting in ini for arg in ("-d", setting)]
    done = subprocess.run(
        ["php", *settings, str(script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def address(svc) -> str:
    host, port = svc.tcp
    return f"{host}:{port}"


def test_call_over_tcp_on_one_persistent_connection(service, tmp_path):
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
show($bg->call('test', 'x'));
show($bg->call('echo', "binary\\0safe:with:colons"));
show(strlen($bg->call('echo', str_repeat('x', 3000000))));
show($bg->ping());
show($bg->stats()['connections']['total']);
""",
        address(service),
    )
    assert out[:4] == ['"Test"', '"binary\\u0000safe:with:colons"', "3000000", "true"]
    assert out[4] == "1"  # every call above went over the one connection


def test_error_replies_are_exceptions_with_their_code(service, tmp_path):
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
foreach (['nosuch:x', 'fail:x', 'sleep:abc'] as $request) {
    list($module, $data) = explode(':', $request, 2);
    try { $bg->call($module, $data); echo "no exception\\n"; }
    catch (BackgroundServiceException $e) { show([$e->getCode(), $e->getMessage()]); }
}
show($bg->call('test'));  // the connection goes on after an error reply
""",
        address(service),
    )
    assert out[0] == '[400,"Unknown request"]'
    assert out[1] == '[501,"Module fail has no TCP handler"]'
    assert out[2].startswith("[400,")
    assert out[3] == '"Test"'


def test_timeout_then_the_next_call_works(service, tmp_path):
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
try { $bg->call('sleep', '3000', 0.3); echo "no timeout\\n"; }
catch (BackgroundServiceTimeout $e) { echo "timeout\\n"; }
show($bg->call('test'));
""",
        address(service),
    )
    assert out == ["timeout", '"Test"']


def test_service_down_is_its_own_exception_and_send_never_throws(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1], 2.0);
try { $bg->call('less', 'a {}'); }
catch (BackgroundServiceDown $e) { echo "fallback\\n"; }
show($bg->send('log', 'nobody listens'));
""",
        f"127.0.0.1:{port}",
    )
    assert out[0] == "fallback"
    assert out[1] in ("true", "false")  # UDP cannot know; it must just not throw


NOTE = """
from pathlib import Path

def handle_udp(request):
    with open(Path(__file__).with_name("notes.log"), "a") as f:
        f.write(request.text + "\\n")
"""


def test_send_over_udp_and_unix_datagram(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "note", NOTE)
    dgram = tmp_path / "bg.dgram"
    svc = make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix_dgram = "{dgram}"\n'
    )
    php(
        tmp_path,
        """
$udp = new BackgroundService($argv[1]);
show($udp->send('note', 'over udp'));
$unix = new BackgroundService($argv[1], 5.0, 'udg://' . $argv[2]);
show($unix->send('note', 'over unix'));
""",
        address(svc),
        str(dgram),
    )
    notes = modules_dir / "notes.log"
    wait_until(lambda: notes.exists() and sorted(notes.read_text().split("\n")[:-1]) == [
        "over udp", "over unix"])  # fmt: skip


def test_send_over_unix_datagram_never_waits_for_a_stopped_service(make_service, tmp_path):
    # docs/deploy.md: send() over udg:// "never blocks the request". Linux queues only
    # net.unix.max_dgram_qlen (10) datagrams on a Unix datagram socket nobody reads, and
    # the client wrote on a blocking socket: the 11th send waited for room, for ever for
    # a hung service (SIGSTOP), or the stream's 60 s default timeout per send.
    dgram = tmp_path / "bg.dgram"
    svc = make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix_dgram = "{dgram}"\n'
    )
    qlen = Path("/proc/sys/net/unix/max_dgram_qlen")
    queued = int(qlen.read_text()) if qlen.exists() else 10
    svc.signal(signal.SIGSTOP)
    try:
        try:
            out = php(
                tmp_path,
                """
$bg = new BackgroundService($argv[1], 5.0, 'udg://' . $argv[2], false);
$sent = 0;
for ($i = 0; $i < 50; $i++) {
    $sent += $bg->send('test', "datagram $i") ? 1 : 0;
}
show([$i, $sent]);
""",
                address(svc),
                str(dgram),
                timeout=20,  # far more than 50 sends take: not a timing, a hang
            )
        except subprocess.TimeoutExpired:
            pytest.fail("send() over udg:// waited for a stopped service")
    finally:
        svc.signal(signal.SIGCONT)
    done, sent = json.loads(out[0])
    assert done == 50
    if queued < 50:  # the queue filled up: the rest were dropped, and send() said so
        assert 0 < sent < 50, out
    assert svc.call(b"test:x") == b"Test"  # the service goes on


def test_after_several_jobs_in_one_string_as_old_sites_wrote_it(service, tmp_path):
    # The old one-file client passed `after` on as it was, and the service takes
    # after=D1,D2; the new client threw on "$a,$b" (and a list went out as after[0]=).
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
$a = $bg->add('echo', 'a');
$b = $bg->add('sleep', '1000');
$both = $bg->add('echo', 'after both', ['after' => "$a,$b"]);
$list = $bg->add('echo', 'after the list', ['after' => ["id:$a", $b]]);
show($bg->status($both)['after'] === [$a, $b] && $bg->status($list)['after'] === [$a, $b]);
$bg->get($a);
show([$bg->status($both)['state'], $bg->status($list)['state']]);  // $b still runs
show([$bg->get($both), $bg->get($list), $bg->check($b)]);
try { $bg->add('echo', 'x', ['after' => "$a,id:oops"]); echo "no exception\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
""",
        address(service),
    )
    assert out[:3] == ["true", '["waiting","waiting"]', '["after both","after the list",2]']
    assert "'id:oops'" in out[3], out



def test_add_refuses_wait_and_points_to_run(service, tmp_path):
    # add(..., ['wait' => 1]) sent queue:add?wait=1: the job ran, and its result then
    # failed to read as an id (an exception for a job that had run). Refused, unsent.
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
try { $bg->add('echo', 'x', ['wait' => 1]); echo "no exception\\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
try { $bg->addMany([['echo', 'y', ['wait' => true]]]); echo "no exception\\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
show($bg->add('echo', 'first'));  // nothing was queued before it
show($bg->run('echo', 'ran', ['priority' => 1]));
""",
        address(service),
    )
    assert len(out) == 4 and all("run() adds a job and waits" in line for line in out[:2]), out
    assert out[2:] == ["1", '"ran"']

def test_call_over_a_unix_stream_socket(make_service, tmp_path):
    path = tmp_path / "bg.sock"
    svc = make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix = "{path}"\n'
    )
    assert svc.info
    out = php(
        tmp_path,
        "$bg = new BackgroundService('unix://' . $argv[1]);\nshow($bg->call('test'));\n",
        str(path),
    )
    assert out == ['"Test"']


def test_every_queue_method_and_option(service, tmp_path):
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
$first = $bg->add('sleep', '300', ['priority' => 5, 'retries' => 2, 'backoff' => 0.1,
    'timeout' => 10, 'unique' => 'key:with:colons']);
show($bg->add('sleep', '300', ['unique' => 'key:with:colons']) === $first);
$later = $bg->add('echo', 'after it', ['after' => $first, 'delay' => 0.1]);
$at = $bg->add('echo', 'at a time', ['at' => microtime(true) + 0.2]);
show(in_array($bg->check($first), [0, 1], true));
$status = $bg->status($first);
show([$status['priority'], $status['max_retries'], $status['timeout'], $status['unique']]);
show($bg->get($later));
show($bg->get($at));
show($bg->check($first));
$cancel = $bg->add('sleep', '100', ['delay' => 30]);
show($bg->cancel($cancel));
try { $bg->get($cancel); } catch (BackgroundServiceException $e) { show($e->getCode()); }
show($bg->retry($cancel) === $cancel);  // it runs again at once
show(in_array($bg->cancel($cancel), ['cancelled', 'cancelling'], true));
try { $bg->add('sleep', '1', ['bogus' => 1]); }
catch (InvalidArgumentException $e) { echo "refused\\n"; }
try { $bg->get(999999); } catch (BackgroundServiceException $e) { show($e->getCode()); }
""",
        address(service),
    )
    assert out == [
        "true",
        "true",
        '[5,2,10,"key:with:colons"]',
        '"after it"',
        '"at a time"',
        "2",
        '"cancelled"',
        "410",
        "true",
        "true",
        "refused",
        "404",
    ]


def as_php_has_it(value):
    """``value`` as PHP's json_decode($json, true) and json_encode() give it back: a JSON
    object without keys becomes an empty PHP array, written back as ``[]``."""
    if isinstance(value, dict):
        return {key: as_php_has_it(item) for key, item in value.items()} if value else []
    if isinstance(value, list):
        return [as_php_has_it(item) for item in value]
    return value


def test_modules_jobs_and_queue_stats_read_what_the_python_client_reads(service, tmp_path):
    # The PHP client had no modules(), no listing and no queue statistics (only request()
    # and a json_decode of one's own): they ask as the Python client's modules(), list()
    # and queue_stats() do, the same arguments giving the same page.
    with Client(address(service), timeout=10) as bg:
        assert bg.get(bg.add("echo", "done")) == b"done"
        with pytest.raises(ReplyError):
            bg.get(bg.add("sleep", "not a number"))  # a failed job
        later = [bg.add("echo", f"later {n}", delay=3600, name="nightly") for n in range(3)]
        out = php(
            tmp_path,
            """
$bg = new BackgroundService($argv[1]);
show($bg->modules());
show($bg->jobs());
show($bg->jobs('waiting', 1, 1));
show($bg->jobs(null, 2));
show($bg->jobs('done', 5));
show($bg->queueStats());
show($bg->queueStats(60));
show($bg->jobs(module: 'echo', name: 'nightly', limit: 2));
show($bg->jobs('failed', tag: 'none'));
""",
            address(service),
        )
        python = [
            bg.modules(),
            bg.list(),
            bg.list("waiting", 1, 1),
            bg.list(None, 2),
            bg.list("done", 5),
            bg.queue_stats(),
            bg.queue_stats(60),
            bg.list(module="echo", name="nightly", limit=2),
            bg.list("failed", tag="none"),
        ]
    shown = [json.loads(line) for line in out]
    for stats in (*shown[5:7], *python[5:7]):  # jobs finished in the last minute: a clock's
        assert isinstance(stats.pop("finished_per_minute"), int), stats
    assert shown == as_php_has_it(python)
    assert "echo" in [module["name"] for module in shown[0]]
    assert sorted(shown[1]) == ["failed", "running", "waiting"]
    assert [job["id"] for job in shown[2]["waiting"]] == [later[1]]  # the second page of 1
    assert [len(jobs) for jobs in shown[3].values()] == [2, 0, 1]
    assert shown[4]["done"][0]["module"] == "echo"
    counts = {"waiting": 3, "running": 0, "done": 1, "failed": 1, "cancelled": 0}
    assert shown[5]["counts"] == counts and shown[5]["names"] == {
        "nightly": {"waiting": 3, "running": 0}
    }
    assert [shown[5]["window"]["seconds"], shown[6]["window"]["seconds"]] == [3600, 60]
    # Filtered (module=, name=, tag=), as PHP 8's named arguments give them.
    assert [job["id"] for job in shown[7]["waiting"]] == later[:2]
    assert shown[8] == {"failed": []}


def test_jobs_and_queue_stats_refuse_what_the_service_would_before_sending(service, tmp_path):
    # Each would be the service's 400; refused by the client, as its other options are.
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
$sent = fn () => $bg->stats()['modules']['queue']['tcp']['requests'] ?? 0;
$before = $sent();
$refused = [
    fn () => $bg->jobs('finished'), fn () => $bg->jobs(''), fn () => $bg->jobs(null, 0),
    fn () => $bg->jobs('done', -5),
    fn () => $bg->jobs(null, 10, -1), fn () => $bg->queueStats(0.5), fn () => $bg->queueStats(-60),
    fn () => $bg->queueStats(NAN), fn () => $bg->queueStats(INF),
];
foreach ($refused as $ask) {
    try { $ask(); echo "sent\n"; }
    catch (InvalidArgumentException $e) { show($e->getMessage()); }
}
show($sent() - $before);  // no queue request went out
show([$bg->jobs('failed', 1, 0), $bg->queueStats(1)['window']['seconds']]);  // the least each takes
""",
        address(service),
    )
    shown = [json.loads(line) for line in out]
    states = "jobs(): state must be null (the waiting, running and failed jobs) or one of "
    states += "waiting, running, done, failed, cancelled, not"
    at_least_1 = "jobs(): limit must be at least 1 (null: the service's 100), not"
    window = "queueStats(): window must be null or a finite number of seconds of at least 1, not"
    assert shown == [
        f"{states} 'finished'",
        f"{states} ''",
        f"{at_least_1} 0",
        f"{at_least_1} -5",
        "jobs(): offset must be 0 or more, not -1",
        f"{window} 0.5",
        f"{window} -60.0",
        f"{window} NAN",
        f"{window} INF",
        0,
        [{"failed": []}, 1],
    ], out


def test_a_module_name_the_service_would_read_as_another_is_refused(service, tmp_path):
    # "echo:x" called module echo with the data "x:y", and "ec ho" or "echo\n" called
    # echo: the service cuts the name at the first ':' and drops any other character
    # (bgservice/protocol.py). Every method that takes a module refuses them, unsent.
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
$methods = [
    'call' => fn ($module) => $bg->call($module, 'y'),
    'send' => fn ($module) => $bg->send($module, 'y'),
    'add' => fn ($module) => $bg->add($module, 'y'),
    'run' => fn ($module) => $bg->run($module, 'y'),
    'addMany' => fn ($module) => $bg->addMany([['echo', 'fine'], [$module, 'y']]),
    'schedule' => fn ($module) => $bg->schedule('nightly', $module, 'y', ['every' => 3600]),
];
foreach ($methods as $method => $call) {
    foreach (['echo:x', 'ec ho', "echo\n", ''] as $module) {
        try { $call($module); show("$method sent"); }
        catch (InvalidArgumentException $e) { show($e->getMessage()); }
    }
}
show([$bg->add('echo', 'first'), $bg->schedules()]);  // nothing was queued or scheduled
try { $bg->call('no_such-module'); echo "no exception\n"; }  // a name it takes: sent
catch (BackgroundServiceException $e) { show([$e->getCode(), $e->getMessage()]); }
""",
        address(service),
    )
    shown = [json.loads(line) for line in out]
    names = ["'echo:x'", "'ec ho'", "'echo\n'", "''"]
    rule = "one or more of A-Z a-z 0-9 _ -"
    refused = [
        f"module name {name} is not one the service can take: a module name is {rule} "
        "(the service drops any other character, and a ':' ends the name)"
        for name in names
    ]
    in_batch = [f"addMany(): job 1 must be a module name ({rule}) first, not {n}" for n in names]
    assert shown == [*refused * 4, *in_batch, *refused, [1, []], [400, "Unknown request"]], out


def _php_while_hogged(modules_dir, svc, tmp_path, seconds: int, script: str) -> list[str]:
    """``script``'s output, run while a call of ``seconds`` to the module ``hog`` (HOG,
    written before ``svc`` started) blocks its loop (it accepts, greets once it is free)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(address(svc), 30) as busy:
        hog = pool.submit(busy.call, "hog", str(seconds))
        wait_until((modules_dir / "hog.started").exists)
        out = php(tmp_path, script, address(svc))
        assert hog.result(timeout=30) == b"done"
    return out


def test_a_busy_service_is_a_timeout_not_down(modules_dir, make_service, tmp_path):
    # The service accepts while its loop is blocked and greets once it is free: no
    # greeting in time is the timeout a late reply is (it was BackgroundServiceDown).
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    out = _php_while_hogged(modules_dir, svc, tmp_path, 7, """
$short = new BackgroundService($argv[1], 1.0, null, false);
try { $short->ping(); echo "no exception\\n"; }
catch (BackgroundServiceException $e) { show([get_class($e), $e->getMessage()]); }
$patient = new BackgroundService($argv[1], 30.0, null, false);
show($patient->call('echo', 'waited'));
""")
    assert out[0].startswith('["Bgservice\\\\Client\\\\Exception\\\\TimeoutException",'), out
    assert "greet" in out[0] and out[1:] == ['"waited"']


def test_send_refuses_a_message_no_datagram_can_carry(tmp_path):
    # It returned false, which fire-and-forget code does not look at: the message was
    # lost unseen. As a missing datagram address, it is the caller's mistake, up or down.
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
try { $bg->send('echo', str_repeat('x', 100000)); echo "no exception\\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
show($bg->send('echo', str_repeat('x', 65502)));  // the most one UDP datagram takes
show($bg->send('echo', 'small'));
""",
        f"127.0.0.1:{free_port()}",
    )
    assert "more than one datagram" in out[0], out
    assert out[1:] == ["true", "true"]


def test_unix_socket_paths_in_every_form_the_python_client_takes(
    modules_dir, make_service, tmp_path
):
    # A plain path, or unix:PATH, as $address was a ServiceDown at the first call; as
    # $udpAddress (a plain path, or unix:///path) send() connected a stream to the datagram
    # socket and returned false, every message lost. Each form now reaches the service.
    write_module(modules_dir, "note", NOTE)
    sock, dgram = tmp_path / "bg.sock", tmp_path / "bg.dgram"
    make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "local"\nunix = "{sock}"\nunix_dgram = "{dgram}"\n'
    )
    out = php(
        tmp_path,
        """
foreach ([$argv[1], 'unix:' . $argv[1], 'unix://' . $argv[1]] as $address) {
    show((new BackgroundService($address, 5.0, null, false))->call('echo', $address));
}
foreach ([$argv[2], 'unix://' . $argv[2], 'udg://' . $argv[2]] as $udp) {
    show((new BackgroundService($argv[1], 5.0, $udp, false))->send('note', $udp));
}
""",
        str(sock),
        str(dgram),
    )
    called = [str(sock), f"unix:{sock}", f"unix://{sock}"]
    assert [json.loads(line) for line in out] == [*called, True, True, True]
    notes = modules_dir / "notes.log"
    sent = sorted([str(dgram), f"unix://{dgram}", f"udg://{dgram}"])
    wait_until(lambda: notes.exists() and sorted(notes.read_text().split("\n")[:-1]) == sent)


def test_an_address_in_no_documented_form_is_refused_at_construction(tmp_path):
    # Each failed only at the first call: udp:// and udg:// as $address after the whole
    # timeout (a TimeoutException), the others as a ServiceDownException, which the
    # site's fallback took for a service down, hiding the mistake in its configuration.
    out = php(
        tmp_path,
        """
$addresses = ['udp://127.0.0.1:1', 'udg:///run/bg.dgram', '127.0.0.1', '::1:12341', 'http://h:1'];
foreach ($addresses as $address) {
    try { new BackgroundService($address, 30.0); echo "taken\\n"; }
    catch (InvalidArgumentException $e) { show($e->getMessage()); }
}
try { new BackgroundService('127.0.0.1:12341', 30.0, 'tcp://127.0.0.1:12341'); echo "taken\\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
""",
        timeout=20,  # far less than one 30 s timeout: refused at once
    )
    assert len(out) == 6 and "taken" not in out, out
    assert "pass it as $udpAddress" in out[1] and "takes brackets" in out[3], out
    assert "$udpAddress must be" in out[5], out


def test_a_connection_over_max_connections_is_a_service_down_with_its_503(make_service, tmp_path):
    # The service's "503: Too many connections", written instead of the greeting, was
    # read as a wrong greeting: "does not speak the framed protocol", the reason lost.
    svc = make_service("[limits]\nmax_connections = 1\n")
    with Client(address(svc), timeout=10) as held:
        assert held.call("test") == b"Test"  # the one connection it takes
        out = php(
            tmp_path,
            """
try { (new BackgroundService($argv[1], 5.0, null, false))->call('test'); echo "served\\n"; }
catch (BackgroundServiceDown $e) { show([$e->getCode(), $e->getMessage()]); }
""",
            address(svc),
        )
    refused = f"{address(svc)} refused the connection: 503 Too many connections"
    assert [json.loads(line) for line in out] == [[503, refused]]


def test_the_php_example_of_docs_deploy_md_runs_as_written(modules_dir, make_service, tmp_path):
    # It used the deprecated global name and loaded nothing: copied into a site, it was
    # "Class BackgroundService not found".
    write_module(modules_dir, "less", "def handle_tcp(request):\n    return b'css'\n")  # no node
    doc = (REPO / "docs" / "deploy.md").read_text()
    example = doc.split("## Next to PHP-FPM", 1)[1].split("```php\n", 1)[1].split("```", 1)[0]
    assert "vendor/autoload.php" in example and "BackgroundService" not in example
    run = tmp_path / "run"
    run.mkdir()
    make_service(
        '[[listen]]\nname = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        f'[[listen]]\nname = "php"\nunix = "{run}/bg.sock"\nunix_dgram = "{run}/bg.dgram"\n'
    )
    site = tmp_path / "site"
    (site / "vendor").mkdir(parents=True)  # Composer's autoloader, as the package's own file
    autoload = f"<?php\nrequire '{CLIENT.parent}/bgservice.php';\n"
    (site / "vendor" / "autoload.php").write_text(autoload)
    script = site / "index.php"
    script.write_text(
        "<?php\n$source = '@w: 2px; .a { width: @w }'; $file = 'site.less'; $message = 'hi';\n"
        + example.replace("/run/bgservice/", f"{run}/").replace("<?php", "")
        + "\necho json_encode([$css, $bg->ping()]);\n"
    )
    done = subprocess.run(["php", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == ["css", True]


def show_results(variable: str) -> str:
    """PHP: show() each of a batch exception's getResults(), an exception as its class."""
    each = "fn ($r) => is_object($r) ? get_class($r) : $r"
    return f"show(array_map({each}, {variable}->getResults()));\n"


SERVICE_DOWN = "Bgservice\\Client\\Exception\\ServiceDownException"
TIMEOUT = "Bgservice\\Client\\Exception\\TimeoutException"


class Relay:
    """A TCP relay between one client and the service that passes on the client's bytes
    and the service's reply frames, counting them (``replies``); after ``cut_after`` of
    them, it ends the client's side (a FIN: the client reads those, then EOF), as a
    service lost in the middle of a batch would. The replies it keeps back reached no one."""

    def __init__(self, svc, cut_after: int | None = None) -> None:
        self.target = svc.tcp
        self.cut_after = cut_after
        self.replies = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets = [self.listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        service = socket.create_connection(self.target)
        self.sockets += [client, service]
        threading.Thread(target=self._requests, args=(client, service), daemon=True).start()
        with contextlib.suppress(OSError):
            self._replies(service.makefile("rb"), client)
            client.shutdown(socket.SHUT_WR)

    @staticmethod
    def _requests(client: socket.socket, service: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                service.sendall(chunk)

    def _replies(self, service, client: socket.socket) -> None:
        client.sendall(service.read(len(PREFACE)))  # the greeting
        while self.cut_after is None or self.replies < self.cut_after:
            head = service.read(7)  # status, length (docs/protocol.md)
            if len(head) < 7:
                return
            client.sendall(head + service.read(int.from_bytes(head[3:], "big")))
            self.replies += 1

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_get_many_cut_by_a_timeout_keeps_the_replies_that_came(service, tmp_path):
    # The replies read before the timeout were lost with it: "0 answered, 2 sent without
    # a reply", and getResults() had the TimeoutException for the job that had finished.
    out = php(
        tmp_path,
        """
$bg = new BackgroundService($argv[1]);
$fast = $bg->add('echo', 'fast');
$slow = $bg->add('sleep', '60000');
$bg->get($fast);
try { $bg->getMany([$fast, $slow], 2.0); echo "no exception\\n"; }
catch (BackgroundServiceTimeout $e) { show($e->getMessage()); """
        + show_results("$e")
        + "}\n",
        address(service),
    )
    assert "a batch of 2 cut short: 1 answered, 1 sent without a reply (they may have run)" in (
        json.loads(out[0])
    ), out
    assert json.loads(out[1]) == ["fast", TIMEOUT]


def test_an_add_many_cut_short_keeps_the_ids_of_the_jobs_queued(service, tmp_path):
    # The ids the service had replied were lost with the connection: reported as "sent
    # without a reply (they may have run)", so a retry queued those jobs twice. The relay
    # passes one reply of the first window of 64 on, then ends the connection.
    relay = Relay(service, cut_after=1)
    try:
        out = php(
            tmp_path,
            """
$bg = new BackgroundService($argv[1], 30.0, null, false);
try { $bg->addMany(array_fill(0, 66, ['echo', 'x'])); echo "no exception\\n"; }
catch (BackgroundServiceDown $e) { show($e->getMessage()); """
            + show_results("$e")
            + "}\n",
            relay.address,
        )
    finally:
        relay.close()
    cut = "a batch of 66 cut short: 1 answered, 63 sent without a reply (they may have run), 2 not"
    assert cut in json.loads(out[0]), out
    assert json.loads(out[1]) == [1, *[SERVICE_DOWN] * 63, None, None]
    with Client(address(service), timeout=10) as direct:  # the id kept is the job queued
        assert direct.status(1)["module"] == "echo"


def test_queue_options_are_sent_as_their_values_or_refused_before_sending(service, tmp_path):
    # Given to http_build_query() as they were, a Stringable key (a UUID object) was
    # dropped without a word (two jobs for two adds, unique and name NULL), a backed enum
    # went out as "priority[name]=" (a confusing 400 from the service), and a nested list
    # in tags became the tag "Array" with only a PHP warning. A tag with a comma in a list
    # (['a,b']) was sent as two tags, a and b.
    out = php(
        tmp_path,
        """
enum Priority: int { case High = 9; }
enum Region: string { case Eu = 'eu'; }
enum Pure { case One; }
final class Key {
    public function __construct(private string $key) {}
    public function __toString(): string { return $this->key; }
}
$bg = new BackgroundService($argv[1]);
$key = new Key('report:7');
$options = ['unique' => $key, 'name' => $key, 'priority' => Priority::High, 'delay' => 3600,
    'tags' => [Region::Eu, new Key('billing'), 7]];
$first = $bg->add('echo', 'x', $options);
show($bg->add('echo', 'x', $options) === $first);  // the key held: the same job
$status = $bg->status($first);
show([$status['unique'], $status['name'], $status['priority'], $status['tags']]);
$after = $bg->add('echo', 'y', ['after' => [new Key("id:$first")], 'tags' => new Key('one')]);
show([$bg->status($after)['after'], $bg->status($after)['tags']]);
$schedule = $bg->schedule('nightly', 'echo', 'z', ['every' => 3600, 'paused' => true,
    'priority' => Priority::High, 'tz' => new Key('UTC')]);
show([$schedule['paused'], $schedule['options']['priority'], $schedule['tz']]);
$refused = [['priority' => [1]], ['tags' => ['a', ['b']]], ['unique' => new stdClass()],
    ['name' => Pure::One], ['unique' => STDIN], ['tags' => ['a', true]], ['after' => [[1]]],
    ['tags' => ['a,b']], ['tags' => ['a', '']]];
foreach ($refused as $options) {
    try { $bg->add('echo', 'refused', $options); echo "sent\\n"; }
    catch (InvalidArgumentException $e) { show($e->getMessage()); }
}
$jobs = [['echo', 'a'], ['echo', 'b', ['unique' => new ArrayObject()]]];
try { $bg->addMany($jobs); echo "sent\\n"; }
catch (InvalidArgumentException $e) { show($e->getMessage()); }
show($bg->add('echo', 'next') === $after + 1);  // none of those was sent
""",
        address(service),
    )
    shown = [json.loads(line) for line in out]
    assert shown[:4] == [
        True,
        ["report:7", "report:7", 9, ["eu", "billing", "7"]],
        [[1], ["one"]],
        [True, "9", "UTC"],
    ], out
    a_value = "must be a string, an int, a float, a \\Stringable or a backed enum, not"
    one_tag = (  # it was sent as two tags, a and b, or as a blank the service refused
        'must be one tag, not empty and without a comma (a tag is A-Z a-z 0-9 _ . : -; a string '
        '"a,b" is two tags)'
    )
    assert shown[4:] == [
        "option priority takes one value, not an array (only after and tags take a list)",
        f"each item of option tags {a_value} array",
        f"option unique {a_value} stdClass",
        f"option name {a_value} Pure",
        f"option unique {a_value} resource (stream)",
        f"each item of option tags {a_value} bool",
        f"each item of option after {a_value} array",
        f"each item of option tags {one_tag}, not 'a,b'",
        f"each item of option tags {one_tag}, not ''",
        f"option unique {a_value} ArrayObject",
        True,
    ], out


def test_a_call_given_a_longer_timeout_waits_as_long_for_a_busy_services_greeting(
    modules_dir, make_service, tmp_path
):
    # The greeting of the call's new connection was waited for min(call's, client's)
    # timeout: "accepted but did not greet in time" after the client's 1 s, though the
    # call was given 30 (the Python client waits for the call's).
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(address(svc), 30) as busy:
        hog = pool.submit(busy.call, "hog", "4")  # blocks the loop for far more than 1 s
        wait_until((modules_dir / "hog.started").exists)
        out = php(
            tmp_path,
            """
$bg = new BackgroundService($argv[1], 1.0, null, false);
show($bg->call('echo', 'waited', 30.0));
""",
            address(svc),
        )
        assert hog.result(timeout=30) == b"done"
    assert out == ['"waited"']


NAP = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    Path(__file__).with_name(request.text + ".started").touch()
    await asyncio.sleep(60)
    return "woke"
"""


@contextlib.contextmanager
def php_running(tmp_path, name: str, body: str, *args: str):
    """A PHP script run in the background, as ``php()`` runs one; killed if still running."""
    script = tmp_path / f"{name}.php"
    script.write_text(PRELUDE + body)
    proc = subprocess.Popen(
        ["php", str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def php_output(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    return out.splitlines()


def caught(call: str, batch: bool = False) -> str:
    """PHP: make ``call``; show() the class, code and message of what it throws (and, for
    a ``batch``, its getResults())."""
    return (
        f'try {{ {call}; echo "no exception\\n"; }}\n'
        "catch (BackgroundServiceException $e) {\n"
        "    show([get_class($e), $e->getCode(), $e->getMessage()]);\n"
        + (show_results("$e") if batch else "") + "}\n"
    )  # fmt: skip


def test_a_stop_that_cuts_a_call_or_a_queue_operation_is_a_service_down(
    modules_dir, make_service, tmp_path
):
    # The service's "503: Shutting down" (a call the stop cut, an add-and-wait or a get of
    # a job it leaves queued) was a ReplyException, which a fallback written as the docs
    # and the README show it (catch ServiceDownException) did not catch.
    write_module(modules_dir, "nap", NAP)
    svc = make_service("[limits]\nshutdown_grace = 1\n")
    with Client(address(svc), timeout=10) as direct:
        done = direct.add("echo", "done")
        assert direct.get(done) == b"done"
        later = direct.add("echo", "later", delay=3600)
    relay = Relay(svc)  # to see the get of the finished job answered before the stop
    client = "(new BackgroundService($argv[1]))"
    try:
        with (
            php_running(tmp_path, "call", caught(f"{client}->call('nap', 'call')"), address(svc))
            as call,
            php_running(tmp_path, "run", caught(f"{client}->run('nap', 'run')"), address(svc))
            as run,
            php_running(
                tmp_path, "batch", caught(f"{client}->getMany([$argv[2], $argv[3]])", batch=True),
                relay.address, str(done), str(later),
            ) as batch,
        ):  # fmt: skip
            wait_until((modules_dir / "call.started").exists)
            wait_until(lambda: (modules_dir / "run.started").exists() and relay.replies == 1)
            svc.signal(signal.SIGTERM)
            outputs = [php_output(proc) for proc in (call, run, batch)]
    finally:
        relay.close()
    assert svc.wait() == 0
    stopping = "the service at {} is shutting down (503 Shutting down{}): the request may have run"
    queued = f": job {later + 1} is still queued"  # the job run() added: requeued by the stop
    assert [[json.loads(line) for line in out] for out in outputs] == [
        [[SERVICE_DOWN, 503, stopping.format(address(svc), "")]],
        [[SERVICE_DOWN, 503, stopping.format(address(svc), queued)]],
        [
            [SERVICE_DOWN, 503, stopping.format(relay.address, f": job {later} is still queued")
             + "; a batch of 2 cut short: 1 answered, 1 cut by the stop (getResults() has each)"],
            ["done", SERVICE_DOWN],
        ],
    ], outputs  # fmt: skip


def test_a_timeout_waiting_for_a_job_names_the_job_and_that_it_was_sent(
    modules_dir, make_service, tmp_path
):
    # "no reply from 127.0.0.1:N in time", and nothing else: which job was left to guess,
    # so a caller could only add it again (the Python client's ClientTimeout names it).
    # Only the waits race the short timeouts (tests/test_client.py's twin says why).
    from tests.test_cli import HOLD  # held until its DATA.go file is there

    write_module(modules_dir, "hold", HOLD)
    svc = make_service()
    out = php(
        tmp_path,
        """
$setup = new BackgroundService($argv[1], 30.0, null, false);
$held = $setup->add('hold', 'held');
$done = $setup->add('echo', 'done');
$setup->get($done);
show($held);
$bg = new BackgroundService($argv[1], 0.3);
$caught = [];
foreach ([
    fn () => $bg->get("id:$held", 0.2),
    fn () => $bg->get($held),
    fn () => $bg->getMany([$done, $held, $done], 1.0),
    fn () => $bg->run('hold', 'ran', [], 0.2),
] as $call) {
    $bg->call('test', '', 30.0);  // greeted beforehand: only the wait races its timeout
    try { $call(); echo "no exception\\n"; }
    catch (BackgroundServiceTimeout $e) {
        show([$e->getMessage(), $e->getJobId(), $e->wasSent()]);
        $caught[] = $e;
    }
}
touch("$argv[2]/held.go");
touch("$argv[2]/ran.go");
show($bg->get($caught[0]->getJobId(), 30.0));  // followed up by its id, not added again
""",
        address(svc),
        str(modules_dir),
    )
    held = json.loads(out[0])
    late = f"no reply from {address(svc)} in time"
    waited = f"gave up waiting for job {held}"
    goes_on = "(the job goes on)"
    assert [json.loads(line) for line in out[1:]] == [
        [f"{late}: get() {waited} after get()'s timeout of 0.2 s {goes_on}", held, True],
        [f"{late}: get() {waited} after the client's timeout of 0.3 s {goes_on}", held, True],
        [f"{late}; a batch of 3 cut short: 1 answered, 2 sent without a reply (they may have "
         f"run) (getResults() has each): getMany() {waited} (the first without a reply) after "
         f"getMany()'s timeout of 1 s {goes_on}", held, True],
        [f"{late}: run() of module hold gave up after run()'s timeout of 0.2 s: its job may "
         "have been queued, and goes on under an id the client was not told (add() then get() "
         "keeps the id)", None, True],
        "held",
    ], out  # fmt: skip


def test_a_run_that_timed_out_before_sending_says_no_job_was_queued(
    modules_dir, make_service, tmp_path
):
    # The service's loop blocked: the new connection is not greeted, so the request of
    # run() is never written. Its timeout must say so (nothing to follow up, nor to fear
    # adding again), where the one of a run() sent says its job may have been queued.
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    out = _php_while_hogged(modules_dir, svc, tmp_path, 5, """
$bg = new BackgroundService($argv[1], 1.0, null, false);
try { $bg->run('echo', 'never'); echo "no exception\\n"; }
catch (BackgroundServiceTimeout $e) { show([$e->getMessage(), $e->getJobId(), $e->wasSent()]); }
""")
    said = (
        f"{address(svc)} accepted but did not greet in time: run() of module echo gave up "
        "after the client's timeout of 1 s, before its request was sent: no job was queued"
    )
    assert [json.loads(line) for line in out] == [[said, None, False]], out
    with Client(address(svc), timeout=10) as direct:
        assert not any(direct.queue_stats()["counts"].values())


class LongReplyPeer:
    """A framed-protocol peer that is no bgservice: it greets as the service does, then
    answers each request with the text after its last ':' (queue:get:id:7 -> "7"), but a
    request whose text ends in ":big" or ":999" with a header that says ``size`` bytes
    and ``sent`` of them; after those it closes if ``close``, else goes on reading. It
    logs each request (``requests``), and serves any number of connections at once."""

    def __init__(self, size: int, sent: int = 65536, close: bool = False) -> None:
        self.size, self.sent, self.close_after = size, sent, close
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.sockets.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn, conn.makefile("rb") as stream:
            if stream.read(len(PREFACE)) != PREFACE:
                return
            conn.sendall(PREFACE)
            while len(head := stream.read(4)) == 4:
                payload = stream.read(int.from_bytes(head, "big"))
                self.requests.append(payload)
                if payload.endswith((b":big", b":999")):
                    conn.sendall(b"200" + self.size.to_bytes(4, "big") + b"x" * self.sent)
                    if self.close_after:
                        return
                    continue
                body = payload.rsplit(b":", 1)[-1]
                conn.sendall(b"200" + len(body).to_bytes(4, "big") + body)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


TOO_LARGE = "Bgservice\\Client\\Exception\\ReplyTooLargeException"


def test_a_reply_longer_than_max_reply_bytes_is_an_exception_not_a_fatal_error(
    service, tmp_path
):
    # A header that said 3,000,000,000 bytes made PHP reserve them at the first fread():
    # "Allowed memory size of 134217728 bytes exhausted", exit 255, which no catch takes
    # (docs/clients.md: catch (ClientException $e) takes everything the library throws).
    peer = LongReplyPeer(3_000_000_000)
    try:
        out = php(
            tmp_path,
            """
use Bgservice\\Client\\Client;
use Bgservice\\Client\\Exception\\ClientException;
use Bgservice\\Client\\Exception\\ReplyTooLargeException;
use Bgservice\\Client\\Exception\\ServiceDownException;
$bg = new Client($argv[1], 10.0);  // persistent, as a site's
try { $bg->call('echo', 'big'); echo "no exception\\n"; }
catch (ClientException $e) {
    show([get_class($e), $e instanceof ServiceDownException, $e instanceof BackgroundServiceDown,
        $e->getMessage(), $e->getSize(), $e->getLimit()]);
}
show($bg->call('echo', 'after'));  // a new connection: not the rest of the long reply
try { $bg->getMany([1, 999, 2]); echo "no exception\\n"; }
catch (ReplyTooLargeException $e) { show([$e->getMessage(), $e->getSize()]); """
            + show_results("$e")
            + """}
$bg->close();
show((new Client($argv[2], 10.0))->call('test'));  // and a real service, as ever
show(memory_get_peak_usage() < (16 << 20));
""",
            peer.address,
            address(service),
            ini=("memory_limit=128M",),
        )
    finally:
        peer.close()
    said = (
        f"{peer.address} sent a reply of 3000000000 bytes, more than maxReplyBytes=67108864: "
        "the connection is closed (the request may have run)"
    )
    assert [json.loads(line) for line in out] == [
        [TOO_LARGE, True, True, said, 3_000_000_000, 67108864],
        "after",
        [said + "; a batch of 3 cut short: 1 answered, 2 sent without a reply (they may have "
         "run) (getResults() has each)", 3_000_000_000],
        ["1", TOO_LARGE, TOO_LARGE],
        "Test",
        True,
    ], out  # fmt: skip
    sent = [b"echo:big", b"echo:after", b"queue:get:id:1", b"queue:get:id:999"]
    assert peer.requests[:4] == sent, peer.requests  # each once: nothing sent again


def test_a_long_reply_within_max_reply_bytes_is_read_a_little_at_a_time(tmp_path):
    # Each fread() asked for the whole rest of the reply, which PHP reserves before it
    # reads: a reply said to be 500,000,000 bytes, under a limit raised to 1 GiB, was a
    # fatal "Allowed memory size exhausted" at the first read, however little came.
    peer = LongReplyPeer(500_000_000, sent=300_000, close=True)
    try:
        out = php(
            tmp_path,
            """
$bg = new Bgservice\\Client\\Client($argv[1], 10.0, null, false, 1 << 30);
try { $bg->call('echo', 'big'); echo "no exception\\n"; }
catch (BackgroundServiceDown $e) { show([get_class($e), $e->getMessage()]); }
show($bg->call('echo', 'next'));
show(memory_get_peak_usage() < (16 << 20));
""",
            peer.address,
            ini=("memory_limit=128M",),
        )
    finally:
        peer.close()
    lost = f"connection to {peer.address} lost before the reply: the request may have run"
    assert [json.loads(line) for line in out] == [[SERVICE_DOWN, lost], "next", True], out
