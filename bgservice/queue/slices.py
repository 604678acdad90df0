"""A long list worked on a slice per turn of the loop: the reports over 100,000 jobs (a
page's count, the jobs behind the line, a job's position) give the other clients the
loop back between two slices, each slice read at C speed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


async def slices(items: Sequence[T], size: int) -> AsyncIterator[Sequence[T]]:
    """``items``, ``size`` at a time; the loop given back between two (not before the
    first: a short list costs no turn)."""
    for start in range(0, len(items), size):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + size]
