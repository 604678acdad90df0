"""Markdown -> HTML with markdown-it-py: CommonMark plus GitHub's tables, strikethrough,
task lists and footnotes.

markdown-it-py is the maintained Python port of markdown-it (the JavaScript renderer
behind many editors): it follows the CommonMark spec, which Python-Markdown does not, so
the HTML matches what GitHub-style previews show. It is pure Python: 10 KB of Markdown
takes 20-30 ms of CPU holding the GIL, which in a thread would stall the event loop in
5 ms slices; so it runs in worker processes (EXECUTION = "process"), where it stalls nothing.

``markdown:TEXT`` replies the HTML. Options: ``html=0`` escapes raw HTML in the text
(for text from untrusted users), ``breaks=1`` turns single newlines into ``<br>``. Their
values are 1, true, yes, on or 0, false, no, off (any case); anything else is a ``400``:
``html=n`` read as on once let raw HTML through for a client that meant off.
"""

from bgservice import ReplyError

from . import _node

EXECUTION = "process"
OPTIONS = frozenset({"html", "breaks"})

_renderers: dict = {}
INSTALL = "pip install 'markdown-it-py>=3,<5' 'mdit-py-plugins>=0.4,<1'"


def _renderer(html: bool, breaks: bool):
    """A configured MarkdownIt, imported on first use: the import costs 50 ms, which every
    service start would pay (and only the worker processes need it)."""
    key = (html, breaks)
    if key not in _renderers:
        try:
            from markdown_it import MarkdownIt
            from mdit_py_plugins.footnote import footnote_plugin
            from mdit_py_plugins.tasklists import tasklists_plugin
        except ImportError as exc:
            raise ReplyError(503, f"{exc}: install with: {INSTALL}") from None
        md = MarkdownIt("commonmark", {"html": html, "breaks": breaks})
        md.enable(["table", "strikethrough"]).use(footnote_plugin).use(tasklists_plugin)
        _renderers[key] = md
    return _renderers[key]


def handle_tcp(request):
    options, text = _node.parse(request.data, OPTIONS)
    html, breaks = _node.flag(options, "html", True), _node.flag(options, "breaks", False)
    return _renderer(html, breaks).render(text)
