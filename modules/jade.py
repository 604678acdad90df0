"""``jade``: the original's name for Pug (Jade was renamed Pug in 2016); same as ``pug``."""

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
