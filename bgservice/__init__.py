"""bgservice: a background service for web applications."""

from bgservice.errors import ReplyError
from bgservice.request import Request

__all__ = ["ReplyError", "Request", "__version__"]
__version__ = "0.1.0"
