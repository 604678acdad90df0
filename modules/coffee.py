"""CoffeeScript 2 -> JavaScript, with the official ``coffeescript`` compiler in node.

``coffee:SOURCE`` replies the JavaScript, wrapped in a function as ``coffee -c`` does;
``?bare=1:SOURCE`` leaves it unwrapped. ``filename`` names the source in messages. A
syntax error replies 400 with ``file:line:column: error: message``.
"""

from . import _node

OPTIONS = frozenset({"filename", "bare"})
LANG = "coffee"

compilers = _node.acquire()


async def handle_tcp(request):
    options, source = _node.parse(request.data, OPTIONS)
    return await compilers.compile(LANG, source, options)


async def unload():
    await _node.release(compilers)


def stats():
    return compilers.stats(LANG)
