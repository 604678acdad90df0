"""Rate limits per module: at most N job starts per interval (``[queue] module_rates``).

A throttled job waits, it does not fail: it stays in the waiting line and starts once the
window has room, and ``queue:status`` shows when that is (``throttled_until``). The
window slides: a start counts for exactly one interval after it. The embedded engine
keeps the windows here, in memory (a restart forgets starts of the last interval); the
Redis engine keeps one sorted set per module, ``P:rate:MODULE``, shared by every
instance and checked by the CLAIM script.
"""

from __future__ import annotations

import re
from collections import deque

UNITS = {"s": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0,
         "day": 86400.0}  # fmt: skip
RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*")

Rate = tuple[int, float]  # (starts, per seconds)


def parse_rate(text: str) -> Rate:
    """``"10/minute"``, ``"2/s"``, ``"100/5min"``, ``"500/day"`` -> (starts, seconds)."""
    match = RATE.fullmatch(str(text))
    word = match.group(3) if match else ""
    unit = UNITS.get(word) or UNITS.get(word.removesuffix("s"))  # minutes, hours
    if not match or unit is None or int(match.group(1)) < 1:
        raise ValueError(
            f"a rate is N/UNIT (N >= 1; UNIT s, min, hour or day, e.g. 10/minute), not {text!r}"
        )
    per = float(match.group(2) or 1) * unit
    if per <= 0:
        raise ValueError(f"a rate's interval must be positive: {text!r}")
    return int(match.group(1)), per


class Windows:
    """The starts of the last interval, per rate-limited module."""

    def __init__(self, rates: dict[str, Rate]) -> None:
        self.rates = rates
        self._starts: dict[str, deque[float]] = {module: deque() for module in rates}

    def free_at(self, module: str, now: float) -> float | None:
        """None if a job of ``module`` may start now, else when it may."""
        rate = self.rates.get(module)
        if rate is None:
            return None
        count, per = rate
        starts = self._starts[module]
        while starts and starts[0] <= now - per:
            starts.popleft()
        return None if len(starts) < count else starts[0] + per

    def started(self, module: str, now: float) -> None:
        if module in self._starts:
            self._starts[module].append(now)
