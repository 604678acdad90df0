"""LESS 4 -> CSS, with the official ``less`` package in node.

``less:SOURCE`` replies the CSS. Options (docs/modules-shipped.md): ``filename`` (for
messages), ``minify=1`` (minified with Lightning CSS), ``sources={"vars.less": "..."}``
(files the source may ``@import``, passed in the same request) and ``include=FOLDER``
(more files from disk; the folder must be listed in INCLUDE_DIRS). ``@plugin`` and
inline JavaScript are refused. A syntax error replies 400 with ``file:line:column``.
Math is Less 4's default ``parens-division``: ``calc(100% - 8px)`` is left as it is.
"""

from . import _node

# Folders a request may name with include= (and those in $BGSERVICE_INCLUDE_DIRS).
INCLUDE_DIRS: list[str] = []

compiler = _node.Compiler("less", {"filename", "minify", "sources", "include"}, INCLUDE_DIRS)
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
