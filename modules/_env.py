"""Settings of the shipped modules from the environment: a number in a range.

A helper (``_NAME.py``: not a module of its own). Each caller decides what a bad value
does: the compilers collect every problem and fail each compile naming them all
(``_node``), the log module fails its load (``log``).
"""

from __future__ import annotations

import os


def number(
    name: str, default: float, kind: type[int] | type[float], low: float, high: float | None
) -> tuple[float, str | None]:
    """``$name`` as a ``kind`` from ``low`` to ``high`` (None: no upper bound), and None;
    unset or empty: ``default``. Anything else: ``default`` and what is wrong with it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default, None
    try:
        value: float | None = kind(text)
    except ValueError:
        value = None
    if value is not None and low <= value and (high is None or value <= high):  # (not NaN)
        return value, None
    whole = "a whole number" if kind is int else "a number"
    bounds = f"at least {low:g}" if high is None else f"{low:g}-{high:g}"
    return default, f"{name}={text[:40]!r}: must be {whole}, {bounds}"
