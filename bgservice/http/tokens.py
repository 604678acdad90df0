"""Who may use the HTTP API: bearer tokens, each with a name and a scope.

``[http] tokens = { ops = { token = "...", scope = "operate" }, ... }`` names them; the
older single ``[http] token`` (or ``$BGSERVICE_HTTP_TOKEN``) is the token ``default``
with every right. Scopes, each including the one before:

- ``read``: every GET (jobs, results, modules, stats, schedules, /metrics);
- ``add``: and ``POST /api/v1/jobs`` (a web application that queues work);
- ``operate``: everything (cancel, retry, delete, schedules, ``source=``).

With no token configured the API is open to whoever the ``allow`` list lets in.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bgservice.errors import ConfigError

SCOPES = ("read", "add", "operate")


@dataclass(frozen=True)
class Token:
    name: str
    secret: bytes
    scope: str

    def permits(self, method: str, path: str) -> bool:
        if self.scope == "operate" or method in ("GET", "HEAD"):
            return True
        return self.scope == "add" and method == "POST" and path == "/api/v1/jobs"


MIN_TOKEN_CHARS = 8  # every token: [http] token and each of [http] tokens
TOKEN_ENV = "BGSERVICE_HTTP_TOKEN"  # replaces [http] token when set (Tokens.configured_in)


def check_tokens(value: Any) -> dict[str, tuple[str, str]]:
    """``[http] tokens``: name -> {token, scope} -> name -> (token, scope)."""
    if not isinstance(value, dict):
        raise ValueError('must be a table: { NAME = { token = "...", scope = "read" } }')
    out: dict[str, tuple[str, str]] = {}
    for name, entry in value.items():
        if not isinstance(entry, dict) or set(entry) - {"token", "scope"}:
            raise ValueError(f"{name}: must be {{ token = \"...\", scope = \"...\" }}")
        secret, scope = entry.get("token"), entry.get("scope", "read")
        if not isinstance(secret, str) or len(secret) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"{name}: token must be a string of at least {MIN_TOKEN_CHARS} characters"
            )
        if scope not in SCOPES:
            raise ValueError(f"{name}: scope must be one of {', '.join(SCOPES)}")
        if same := next((n for n, (s, _) in out.items() if s == secret), None):
            raise ValueError(_shared(same, name))
        out[str(name)] = (secret, scope)
    return out


def _shared(first: str, second: str) -> str:
    # A secret given to two tokens got the scope of the last one read: one configured to
    # read only could operate. Both names are said, never the secret.
    return f"{first} and {second} have the same token: give each a secret of its own"


class Tokens:
    def __init__(
        self, single: str | None, named: Mapping[str, tuple[str, str]], where: str = "[http] token"
    ) -> None:
        """``single``: the token ``default``, from ``where`` (``[http] token`` or
        ``$BGSERVICE_HTTP_TOKEN``); ``named``: ``[http] tokens``, whose secrets their
        config check found distinct. One shared between the two is a ``ConfigError``
        here, where both are known."""
        self.tokens = [Token(n, s.encode(), scope) for n, (s, scope) in named.items()]
        if single:
            if same := next((t.name for t in self.tokens if t.secret == single.encode()), None):
                raise ConfigError(f"[http] tokens: {_shared(where, same)}")
            self.tokens.append(Token("default", single.encode(), "operate"))

    @classmethod
    def configured_in(cls, token: str | None, named: Mapping[str, tuple[str, str]]) -> Tokens:
        """The tokens a start takes: ``[http] tokens`` (``named``), and
        ``$BGSERVICE_HTTP_TOKEN`` or else ``[http] token``; a ``ConfigError`` as here
        (``serve --check`` asks too)."""
        env = os.environ.get(TOKEN_ENV)
        where = f"${TOKEN_ENV}" if env else "[http] token"
        return cls(env or token, named, where)

    @property
    def configured(self) -> bool:
        return bool(self.tokens)

    def find(self, authorization: str) -> Token | None:
        """The token an ``Authorization: Bearer ...`` header carries, compared as bytes in
        constant time with each. aiohttp decodes header bytes that are not UTF-8 as lone
        surrogates (surrogateescape), so they are encoded back the same way: a stray byte
        is a wrong token, not a 500."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        try:
            raw = given.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no parser produces: no token of ours
            return None
        found = None
        for token in self.tokens:  # all compared, whichever matches
            if hmac.compare_digest(raw, token.secret):
                found = token
        return found
