"""CoffeeScript 2 -> JavaScript, with the official ``coffeescript`` compiler in node.

``coffee:SOURCE`` replies the JavaScript, wrapped in a function as ``coffee -c`` does;
``?bare=1:SOURCE`` leaves it unwrapped. ``filename`` names the source in messages. A
syntax error replies 400 with ``file:line:column: error: message``.
"""

from . import _node

compiler = _node.Compiler("coffee", {"filename", "bare"})
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
