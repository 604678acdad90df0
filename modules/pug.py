"""Pug 3 template + JSON variables -> HTML, with the official ``pug`` package in node.

``pug:TEMPLATE`` replies the HTML; ``pug:?vars={"name":"Ann"}:TEMPLATE`` (URL-encoded)
passes variables. Other options: ``filename``, ``pretty=1``, ``doctype``, ``sources``
and ``include=FOLDER`` (files for ``include``/``extends``; the folder must be listed in
INCLUDE_DIRS). Pug templates are JavaScript: only trusted clients may send them, as with
any module (see ``allow`` in service.config). Errors reply 400 with ``file:line:column``.
"""

from . import _node

# Folders a request may name with include= (and those in $BGSERVICE_INCLUDE_DIRS).
INCLUDE_DIRS: list[str] = []
OPTIONS = frozenset({"filename", "vars", "pretty", "doctype", "sources", "include"})
LANG = "pug"

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
