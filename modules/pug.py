"""Pug 3 template + JSON variables -> HTML, with the official ``pug`` package in node.

``pug:TEMPLATE`` replies the HTML; ``pug:?vars={"name":"Ann"}:TEMPLATE`` (URL-encoded)
passes variables. Other options: ``filename``, ``pretty=1``, ``doctype``, ``sources``
and ``include=FOLDER`` (files for ``include``/``extends``; the folder must be listed in
INCLUDE_DIRS). Pug templates are JavaScript: only trusted clients may send them, as with
any module (see ``allow`` in service.config). Each runs without node's ``process``,
``require`` or ``global``, in a node process that may not start programs nor write files
(docs/modules-shipped.md). Errors reply 400 with ``file:line:column``.
"""

from . import _node

# Folders a request may name with include= (and those in $BGSERVICE_INCLUDE_DIRS).
INCLUDE_DIRS: list[str] = []

compiler = _node.Compiler(
    "pug", {"filename", "vars", "pretty", "doctype", "sources", "include"}, INCLUDE_DIRS
)
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
