"""TypeScript (and TSX/JSX) -> JavaScript, with the official ``typescript`` 5 in node.

``typescript:SOURCE`` replies the JavaScript. Types are stripped, not checked (each
request is one file, as with ``ts.transpileModule``, esbuild or Babel); syntax errors
reply 400 with ``file:line:column: error TSnnnn: message``. Options
(docs/modules-shipped.md): ``target`` (es5 ... es2024, esnext, default es2020), ``module``
(``cjs``, the default, ``esm``, es2015/es2020/es2022/esnext, amd, umd, system), ``jsx``
(react, react-jsx, preserve, ...; also turned on by a ``filename`` ending in .tsx/.jsx),
``filename``, ``minify=1`` (drops comments).
"""

from . import _node

compiler = _node.Compiler("typescript", {"filename", "target", "module", "jsx", "minify"})
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
