"""``jade``: the original's name for Pug (Jade was renamed Pug in 2016); same as ``pug``."""

from . import _node

# Folders a request may name with include= (and those in $BGSERVICE_INCLUDE_DIRS).
INCLUDE_DIRS: list[str] = []

compiler = _node.Compiler(
    "pug", {"filename", "vars", "pretty", "doctype", "sources", "include"}, INCLUDE_DIRS, "jade"
)
handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats
