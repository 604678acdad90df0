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
OPTIONS = frozenset({"filename", "minify", "sources", "include"})
LANG = "less"

compilers = _node.acquire()


async def handle_tcp(request):
    options, source = _node.parse(request.data, OPTIONS)
    _node.sources(options)
    _node.include_root(options, INCLUDE_DIRS)
    return await compilers.compile(LANG, source, options)


async def unload():
    await _node.release(compilers)


def stats():
    return compilers.stats(LANG)
