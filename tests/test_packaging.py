"""The package as `pip install .` builds it: the wheel holds every module and data file of
bgservice/, and the service's modules import from the wheel alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement  # (pytest's own dependency)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bgservice"


def _shipped_files() -> set[str]:
    """What the wheel must hold: every source and data file under bgservice/."""
    files = {p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return {p.relative_to(ROOT).as_posix() for p in files if p.suffix not in {".pyc", ".so"}}


def test_the_wheel_holds_every_package_and_runs_from_itself(tmp_path: Path) -> None:
    # From a copy of what the build reads, so that no build/ left in the checkout by an
    # earlier build lends it files; with build isolation, as a user's `pip install .`.
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "bgservice", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("bgservice-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unpacked")
    missing = _shipped_files() - names
    assert not missing, f"left out of the wheel: {sorted(missing)}"

    modules = sorted(
        ".".join(Path(name).with_suffix("").parts).removesuffix(".__init__")
        for name in names
        if name.endswith(".py")
        and name.startswith("bgservice/")
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
        "print(len(sys.modules))\n"
    )
    unpacked = str(tmp_path / "unpacked")
    # -I: the checkout (and an editable install of it) out of sys.path; the wheel's copy
    # and the installed dependencies only.
    run = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {unpacked!r})\n" + script,
            unpacked,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


# Run in the child: imports of what only an extra installs fail, as on a machine with
# the base install alone (`scripts/install.sh`, `pip install .`).
BASE_ONLY = """
import runpy, sys

# None in sys.modules: an import raises ModuleNotFoundError and importlib.util.find_spec
# says None, as for a distribution that is not installed.
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, themselves included (extras' requirements left out)."""
    seen: set[str] = set()
    while names:
        name = names.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in needs:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                names.append(requirement.name)
    return seen


def test_the_base_install_serves_without_any_extra(tmp_path: Path) -> None:
    # The quick start (install.sh: no extra) failed at every command: a module read at
    # every start imported multidict, which only aiohttp ([http]) brings.
    base = _closure(["bgservice"])
    blocked = {
        top
        for top, dists in packages_distributions().items()
        if not {d.lower().replace("_", "-") for d in dists} & base and top.isidentifier()
    }
    assert {"aiohttp", "multidict", "redis"} <= blocked
    ready = tmp_path / "ready.json"
    service = subprocess.Popen(
        [sys.executable, "-c", BASE_ONLY, ",".join(sorted(blocked)), str(ROOT / "service.py"),
         "-p", "0", "--host", "127.0.0.1", "-m", str(ROOT / "modules"),
         "--db", str(tmp_path / "q.db"), "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and service.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), service.communicate(timeout=10)[0] if service.poll() else ""
        host, port = json.loads(ready.read_text())["listeners"][0]["tcp"]
        client = subprocess.run(
            [sys.executable, "-c", BASE_ONLY, ",".join(sorted(blocked)),
             str(ROOT / "service.py"), "-a", f"{host}:{port}", "call", "test", "x"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (client.returncode, client.stdout) == (0, "Test"), client.stderr
    finally:
        service.terminate()
        output = service.communicate(timeout=30)[0]
    assert service.returncode == 0, output


def test_the_scripts_help_says_how_to_use_them_and_does_nothing_else() -> None:
    # A newcomer's --help to test.sh installed, linted and type-checked, then printed
    # pytest's help (~10 s); install.sh's printed its usage as an error (exit 2).
    for script, usage in (("install.sh", "--print"), ("test.sh", "PYTEST_ARGS")):
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / script), "--help"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert done.returncode == 0 and usage in done.stdout, (script, done)
        assert "ruff" not in done.stdout + done.stderr  # nothing ran
