"""The package as `pip install .` builds it: the wheel holds every module and data file of
bgservice/, and the service's modules import from the wheel alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
