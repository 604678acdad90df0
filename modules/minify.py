"""JavaScript and CSS minification: Terser (JS) and Lightning CSS (CSS) in node.

``minify:SOURCE`` minifies JavaScript; ``minify:?type=css:SOURCE`` (or a ``filename``
ending in .css) minifies CSS. For JavaScript, ``compress=0`` and ``mangle=0`` turn those
passes off. A syntax error replies 400 with ``file:line:column: message``.
"""

from . import _node

OPTIONS = frozenset({"filename", "type", "compress", "mangle"})
LANG = "minify"

compilers = _node.acquire()


async def handle_tcp(request):
    options, source = _node.parse(request.data, OPTIONS)
    return await compilers.compile(LANG, source, options)


async def unload():
    await _node.release(compilers)


def stats():
    return compilers.stats(LANG)
