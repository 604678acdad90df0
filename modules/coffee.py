"""CoffeeScript 2 -> JavaScript, with the official ``coffeescript`` compiler in node.

``coffee:SOURCE`` replies the JavaScript, wrapped in a function as ``coffee -c`` does;
``?bare=1:SOURCE`` leaves it unwrapped. ``filename`` names the source in messages. A
syntax error replies 400 with ``file:line:column: error: message``; a source nested more
than 1,000 levels deep (brackets and indentation) is refused before it is compiled, since
the compiler's time grows with the cube of the nesting.
"""

from . import _node

compiler = _node.Compiler("coffee", {"filename", "bare"})
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
