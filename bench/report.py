"""The benchmark's figures, issue 17's targets for them, and the printed table.

A figure holds, per column (service, reference, original, beanstalkd), the value of every
round and the server CPU per operation; the table prints medians and min-max, the ratio
of the service to the figure's ``versus`` peer, and each target with the measured value
and whether it was met. Nothing here decides a test: the targets are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = {
    "service": "service",
    "reference": "reference",
    "original": "original (node)",
    "beanstalkd": "beanstalkd",
}
SHORT = {"service": "svc", "reference": "ref", "original": "orig", "beanstalkd": "bs"}


@dataclass(frozen=True)
class Target:
    """One target of issue 17: ``measure(figure)`` against ``limit``."""

    label: str
    measure: Callable[[Figure], float | None]
    limit: float
    at_least: bool = True

    def check(self, fig: Figure) -> dict[str, Any]:
        value = self.measure(fig)
        met = None
        if value is not None:
            met = value >= self.limit if self.at_least else value <= self.limit
        return {"target": self.label, "measured": value, "limit": self.limit, "met": met}


def ratio_to(peer: str, limit: float) -> Target:
    return Target(f">= {limit}x {peer}", lambda f: f.ratio(peer), limit)


def p50_within(peer: str) -> Target:
    """The service's median latency no higher than the peer's (measured: their ratio)."""
    return Target(f"p50 <= {peer}'s", lambda f: f.latency_ratio(peer), 1.0, at_least=False)


def rate_at_least(limit: float, unit: str) -> Target:
    return Target(f">= {limit:,.0f} {unit}", lambda f: f.median("service"), limit)


def cpu_at_most(us: float) -> Target:
    return Target(f"<= {us:.0f} us CPU/op", lambda f: f.cpu("service"), us, at_least=False)


def loss_at_most(percent: float) -> Target:
    return Target(f"{percent:.0f} % lost", lambda f: f.median("service"), percent, at_least=False)


@dataclass
class Figure:
    name: str
    unit: str
    peers: tuple[str, ...] = ("service", "reference")  # the columns it is measured on
    versus: str = "reference"  # the ratio printed is service / this peer
    targets: tuple[Target, ...] = ()
    rounds: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add(self, column: str, value: float, cpu_us: float | None = None) -> None:
        self.rounds.setdefault(column, []).append(value)
        if cpu_us is not None:
            self.cpu_us.setdefault(column, []).append(cpu_us)

    def note(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)

    def median(self, column: str) -> float | None:
        values = self.rounds.get(column)
        return statistics.median(values) if values else None

    def cpu(self, column: str) -> float | None:
        values = self.cpu_us.get(column)
        return statistics.median(values) if values else None

    def ratio(self, peer: str) -> float | None:
        return _ratio(self.median("service"), self.median(peer))

    def latency_ratio(self, peer: str) -> float | None:
        p50 = {c: self.extra.get(f"{c} p50_us") for c in ("service", peer)}
        return _ratio(*(statistics.median(v) if v else None for v in p50.values()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "peers": list(self.peers),
            "versus": self.versus,
            "rounds": self.rounds,
            "cpu_us": self.cpu_us,
            "extra": self.extra,
            "targets": [t.check(self) for t in self.targets],
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> dict[str, Any]:
    import uvloop

    cpu = next(
        (li.split(":", 1)[1].strip() for li in Path("/proc/cpuinfo").read_text().splitlines()
         if li.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "kernel": platform.release(),
    }


# --- the table --------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(f: dict[str, Any], column: str) -> str:
    if column not in f["peers"]:
        return ""
    values = f["rounds"].get(column)
    if not values:
        return "skipped"
    return f"{_num(statistics.median(values))} ({_num(min(values))}-{_num(max(values))})"


def _verdict(check: dict[str, Any]) -> str:
    value, limit = check["measured"], check["limit"]
    if value is None:
        return "n/a"
    if check["met"]:
        return f"{_num(value)} met"
    return f"{_num(value)} missed by {_num(abs(limit - value))}"


def _ratio_cell(f: dict[str, Any]) -> str:
    svc, other = f["rounds"].get("service"), f["rounds"].get(f["versus"])
    if f["unit"] == "% lost" or not svc or not other or not statistics.median(other):
        return "-"
    return f"{statistics.median(svc) / statistics.median(other):.2f} x {SHORT[f['versus']]}"


def _cpu_cell(f: dict[str, Any], columns: list[str]) -> str:
    cells = []
    for column in columns:
        values = f["cpu_us"].get(column)
        cells.append(f"{statistics.median(values):.1f}" if values else "-")
    return " / ".join(cells)


def _rows(report: dict[str, Any], columns: list[str]) -> list[list[str]]:
    cpu_head = "CPU us/op " + "/".join(SHORT[c] for c in columns)
    rows = [["figure", "unit", *(COLUMNS[c] for c in columns), "ratio", "target",
             "measured vs target", cpu_head]]  # fmt: skip
    for f in report["figures"]:
        rows.append([
            f["name"], f["unit"], *(_cell(f, c) for c in columns), _ratio_cell(f),
            "; ".join(t["target"] for t in f["targets"]),
            "; ".join(_verdict(t) for t in f["targets"]),
            _cpu_cell(f, columns),
        ])  # fmt: skip
    return rows


def _latencies(f: dict[str, Any]) -> str | None:
    parts = []
    for column in COLUMNS:
        p50, p99 = (f["extra"].get(f"{column} {k}") for k in ("p50_us", "p99_us"))
        if p50 and p99:
            parts.append(f"{column} {statistics.median(p50):,.0f}/{statistics.median(p99):,.0f}")
    return f"  {f['name']}: p50/p99 us: " + ", ".join(parts) if parts else None


def _extras(f: dict[str, Any]) -> str | None:
    keys = [k for k in f["extra"] if not k.endswith(("p50_us", "p99_us"))]
    if not keys:
        return None
    return f"  {f['name']}: " + ", ".join(
        f"{k} {_num(statistics.median(f['extra'][k]))}" for k in keys
    )


def table(report: dict[str, Any]) -> str:
    columns = [c for c in COLUMNS if any(c in f["peers"] for f in report["figures"])]
    rows = _rows(report, columns)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for f in report["figures"]:
        lines += [line for line in (_latencies(f), _extras(f)) if line]
    lines.append("memory (resident MB): " + json.dumps(report["memory_mb"]))
    lines.append("service only: " + json.dumps(report["service_only"]))
    lines.append("machine: " + json.dumps(report["machine"]))
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
