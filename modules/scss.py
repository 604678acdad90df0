"""Sass, SCSS syntax -> CSS, with Dart Sass (the reference implementation) in node.

``scss:SOURCE`` replies the CSS. Options (docs/modules-shipped.md): ``filename`` (for
messages), ``minify=1`` (compressed style), ``sources={"_theme.scss": "..."}`` (files the
source may ``@use``/``@forward``/``@import``, passed in the same request) and
``include=FOLDER`` (more files from disk; the folder must be listed in INCLUDE_DIRS).
A syntax error replies 400 with ``file:line:column: message``.
"""

from . import _node

# Folders a request may name with include= (and those in $BGSERVICE_INCLUDE_DIRS).
INCLUDE_DIRS: list[str] = []

compiler = _node.Compiler("scss", {"filename", "minify", "sources", "include"}, INCLUDE_DIRS)
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
