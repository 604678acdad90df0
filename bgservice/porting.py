"""The original's module hook names, refused with the name a bgservice module uses.

BackgroundService (Node.js) called ``UExecute(parts)``, ``TExecute(parts, client)`` and
``Unload()``. They are refused rather than supported: the calling conventions differ
(``parts`` and ``client.write()`` there, one ``request`` and a return value here), so an
alias would call a ported function with the wrong arguments, and a silently ignored hook
is what a porter must not get. A module that also defines the Python name is left alone
(it may keep the old name as a shim for its own callers).
"""

from __future__ import annotations

from collections.abc import Mapping

# The original's name -> (the Python name, how it is called here).
ORIGINAL_HOOKS: dict[str, tuple[str, str]] = {
    "UExecute": ("handle_udp", "handle_udp(request)"),
    "TExecute": ("handle_tcp", "handle_tcp(request), returning the reply"),
    "Unload": ("unload", "unload()"),
}


def original_hooks_problem(namespace: Mapping[str, object]) -> str | None:
    """A load error naming each original hook the module defines without its Python
    name, or None when there is none."""
    found = [  # (sorted: the order docs/modules.md shows, TExecute before UExecute)
        f"{old} is the original's hook name: define {signature} instead"
        for old, (new, signature) in sorted(ORIGINAL_HOOKS.items())
        if old in namespace and new not in namespace
    ]
    if not found:
        return None
    return "; ".join(found) + " (docs/modules.md, 'Porting a module from the original')"
