"""Time per compile of a ~10 KB source in each shipped compiler module, against a real service.

Usage: python3 bench/compile_times.py [--runs 50] [--warmup 20] [--timeout 30]

Starts ``python service.py`` on a free port with the repo's modules, then for each language
sends the same request (one connection per call, as the original's PHP clients do) after a
warm-up, and prints the median and 90th percentile of the round trip in milliseconds
(nearest rank: with one run, both are that run). Needs node and ``npm ci --prefix
compilers``. The service is stopped however the script ends (SIGTERM, SIGINT and SIGHUP
exit 143, 130 and 129; bench/children.py).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

# A sibling in bench/: this file runs as a script, so bench/ is first on sys.path.
from children import Children, Interrupted, stop_process

REPO = Path(__file__).resolve().parent.parent
TARGET = 10_000


def grow(head: str, block: Callable[[int], str], tail: str = "") -> str:
    """``head`` + numbered blocks until the source is about TARGET bytes."""
    parts, n = [head], 0
    while sum(map(len, parts)) < TARGET:
        parts.append(block(n))
        n += 1
    return "".join(parts) + tail


SOURCES: dict[str, str] = {
    "scss": grow(
        '@use "sass:math";\n$base: 16px;\n@mixin pad($n) { padding: math.div($base, $n); }\n'
        "%reset { margin: 0; }\n",
        lambda n: (
            f".card-{n} {{ @extend %reset; @include pad({n % 4 + 1});\n"
            f"  .title {{ font-size: $base * 1.{n % 9}; &:hover {{ color: #{n % 999:03d}; }} }}\n"
            f"  .body {{ width: calc(100% - {n}px); }} }}\n"
        ),
    ),
    "sass": grow(
        '@use "sass:math"\n$base: 16px\n=pad($n)\n  padding: math.div($base, $n)\n',
        lambda n: (
            f".card-{n}\n  +pad({n % 4 + 1})\n  .title\n    font-size: $base * 1.{n % 9}\n"
            f"    &:hover\n      color: #{n % 999:03d}\n"
        ),
    ),
    "less": grow(
        "@base: 16px;\n.pad(@n) { padding: (@base / @n); }\n"
        ".size(@a) when (@a > 10px) { height: @a; }\n.size(@a) when (@a <= 10px) { height: 0; }\n",
        lambda n: (
            f".card-{n} {{ .pad({n % 4 + 1}); .size({n}px); width: calc(100% - 8px);\n"
            f"  .title {{ font-size: @base * 1.{n % 9};\n"
            f"    &:hover {{ color: #{n % 999:03d}; }} }} }}\n"
        ),
    ),
    "typescript": grow(
        "enum Kind { A, B }\n",
        lambda n: (
            f"class Item{n} {{\n  constructor(private readonly id: number, public kind: Kind)"
            f" {{}}\n  label(x?: {{ name?: string }}): string {{\n"
            f"    return `${{this.id}}:${{x?.name ?? 'item{n}'}}`;\n  }}\n"
            f"  async load(): Promise<number> {{ return this.id * {n}; }}\n}}\n"
        ),
    ),
    "coffee": grow(
        "",
        lambda n: (
            f"class Item{n}\n  constructor: (@id) ->\n"
            f"  label: (x) -> \"#{{@id}}:#{{x?.name ? 'item{n}'}}\"\n"
            f"  load: -> await Promise.resolve(@id * {n})\n"
            f"squares{n} = (x * x for x in [1..{n % 9 + 1}])\n"
        ),
    ),
    "pug": grow(
        "doctype html\nhtml\n  body\n",
        lambda n: (
            f"    section.card(id='c{n}')\n      h2= title + ' {n}'\n      ul\n"
            f"        each item in items\n"
            f"          li(class=item.done ? 'done' : undefined)= item.name\n"
        ),
    ),
    "markdown": grow(
        "# Notes\n\n",
        lambda n: (
            f"## Part {n}\n\nSome *text* with `code` and a [link](https://example.com/{n}).\n\n"
            f"| a | b |\n|---|---|\n| {n} | ~~{n * 2}~~ |\n\n```python\nprint({n})\n```\n\n"
        ),
    ),
    "minify-js": grow(
        "",
        lambda n: (
            f"function compute{n}(values, factor) {{\n  // sum the scaled values\n"
            f"  let total = 0;\n  for (const value of values) {{ total += value * factor; }}\n"
            f"  return total > {n} ? total : {n};\n}}\nconsole.log(compute{n}([1, 2, 3], {n}));\n"
        ),
    ),
    "minify-css": grow(
        "",
        lambda n: (
            f".card-{n} {{\n  color: #ff0000;\n  margin: 0px 0px 0px 0px;\n"
            f"  padding: {n}px;\n}}\n.card-{n}:hover {{ color: red; }}\n"
        ),
    ),
}
OPTIONS = {
    "pug": "?"
    + urllib.parse.urlencode({"vars": json.dumps({"title": "T", "items": [{"name": "a"}]})})
    + ":",
    "minify-css": "?type=css:",
}


def start_service(children: Children, folder: Path, timeout: float) -> tuple[str, int]:
    config = folder / "service.config"
    config.write_text(
        f'modules = "{REPO / "modules"}"\ndb = "{folder / "jobs.db"}"\n'
        '[[listen]]\nname = "bench"\nhost = "127.0.0.1"\nport = 0\n'
    )
    ready, log = folder / "ready.json", folder / "service.log"
    command = [sys.executable, str(REPO / "service.py"), "-c", str(config)]
    with log.open("wb") as err:
        proc = children.spawn(
            [*command, "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=err
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise SystemExit(f"service did not start within {timeout:g} s: {log.read_text()}")
        time.sleep(0.05)
    host, port = json.loads(ready.read_text())["listeners"][0]["tcp"]
    return host, port


def call(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


# A comment that makes each run's source unique, so the compile cache cannot answer it.
COMMENT = {"scss": "/* run {} */\n", "sass": "// run {}\n", "less": "/* run {} */\n",
           "typescript": "// run {}\n", "coffee": "# run {}\n", "pug": "//- run {}\n",
           "markdown": "<!-- run {} -->\n", "minify-js": "// run {}\n",
           "minify-css": "/* run {} */\n"}  # fmt: skip


def payload(name: str, run: int | None) -> bytes:
    module = name.split("-")[0]
    source = SOURCES[name] if run is None else COMMENT[name].format(run) + SOURCES[name]
    return f"{module}:{OPTIONS.get(name, '')}{source}".encode()


def checked_call(address: tuple[str, int], data: bytes) -> bytes:
    reply = call(address, data)
    if reply[:3].isdigit() and reply[3:4] == b":":
        raise SystemExit(f"{data[:20]!r}: {reply[:300].decode()}")
    return reply


def median_p90(times: list[float]) -> tuple[float, float]:
    """The median and the nearest-rank 90th percentile (defined for a single run, which
    statistics.quantiles is not)."""
    ranked = sorted(times)
    return statistics.median(ranked), ranked[math.ceil(0.9 * len(ranked)) - 1]


def timed(address: tuple[str, int], payloads: list[bytes]) -> tuple[float, float, int]:
    """(median ms, p90 ms, reply length) of one call per payload (at least one)."""
    times, reply = [], b""
    for data in payloads:
        start = time.perf_counter()
        reply = checked_call(address, data)
        times.append((time.perf_counter() - start) * 1000)
    return (*median_p90(times), len(reply))


def measure(address: tuple[str, int], name: str, runs: int, warmup: int) -> str:
    for n in range(1, warmup + 1):
        checked_call(address, payload(name, -n))
    median, p90, out = timed(address, [payload(name, n) for n in range(runs)])
    cached, cached_p90, _ = timed(address, [payload(name, None)] * runs)
    return (
        f"| {name:<10} | {len(SOURCES[name]):>6} | {out:>7} | {median:>6.1f} | {p90:>6.1f} "
        f"| {cached:>6.1f} | {cached_p90:>6.1f} |"
    )


def count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, not {text!r}")
        return value

    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=count(1), default=50, help="timed calls (default 50)")
    parser.add_argument("--warmup", type=count(0), default=20, help="untimed calls first")
    parser.add_argument(
        "--timeout", type=seconds, default=30.0, help="seconds the service may take to start"
    )
    args = parser.parse_args()
    children = Children()
    children.catch_signals()
    folder: Path | None = None
    try:
        with children.held():  # the folder is known to the clean-up before a stop can come
            folder = Path(tempfile.mkdtemp(prefix="bgcompile-"))
        report(start_service(children, folder, args.timeout), args.runs, args.warmup)
    except Interrupted as stop:
        print(f"compile_times: stopped by {stop}; the service is stopped", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    finally:
        with children.held():
            children.close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        children.release_signals()


def report(address: tuple[str, int], runs: int, warmup: int) -> None:
    print(f"{runs} calls each after {warmup} warm-up, one connection per call;")
    print("compile: a new source every call; cached: the same source again")
    print("| module     | in (B) | out (B) | compile ms | p90 | cached ms | p90 |")
    print("|------------|-------:|--------:|-------:|-------:|-------:|-------:|")
    for name in SOURCES:
        print(measure(address, name, runs, warmup))


if __name__ == "__main__":
    main()
