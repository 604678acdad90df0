"""bgservice: a background service for web applications."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgservice.errors import ReplyError
    from bgservice.request import Request

__all__ = ["ReplyError", "Request", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``ReplyError`` and ``Request``, imported when first asked for (PEP 562): importing
    the package stays cheap, so the command catches a Ctrl-C while the service's own
    modules load (bgservice.__main__) rather than dying with a traceback."""
    if name == "ReplyError":
        from bgservice.errors import ReplyError

        return ReplyError
    if name == "Request":
        from bgservice.request import Request

        return Request
    raise AttributeError(f"module 'bgservice' has no attribute {name!r}")
