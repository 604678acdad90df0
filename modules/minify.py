"""JavaScript and CSS minification: Terser (JS) and Lightning CSS (CSS) in node.

``minify:SOURCE`` minifies JavaScript; ``minify:?type=css:SOURCE`` (or a ``filename``
ending in .css) minifies CSS. For JavaScript, ``compress=0`` and ``mangle=0`` turn those
passes off. A syntax error replies 400 with ``file:line:column: message``.
"""

from . import _node

compiler = _node.Compiler("minify", {"filename", "type", "compress", "mangle"})
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
