"""The secrets the environment may give instead of the config file, so that the file can
be read by more than the service (a deploy's repository, its group) without them:
``$BGSERVICE_HTTP_TOKEN`` for ``[http] token`` and ``$BGSERVICE_REDIS_URL`` for ``[redis]
url`` (a URL holding a password). Each replaces the file's key when set and not empty, and
is checked as the key is; an error names the variable, never its value."""

from __future__ import annotations

import os
from typing import Any

from bgservice.config_checks import check_redis_url
from bgservice.errors import ConfigError
from bgservice.http.tokens import MIN_TOKEN_CHARS, TOKEN_ENV

REDIS_URL_ENV = "BGSERVICE_REDIS_URL"


def apply_env(http: dict[str, Any], redis: dict[str, Any]) -> None:
    """Check ``$BGSERVICE_HTTP_TOKEN`` when the API is on (bgservice.http.tokens reads it
    where it is used) and put ``$BGSERVICE_REDIS_URL`` in ``redis`` (``[redis]`` as read),
    keeping the file's own url as ``file_url``: a password written there is still there for
    every reader of the file (cli.py warns of it)."""
    token = os.environ.get(TOKEN_ENV)
    if http.get("enabled", False) and token and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"${TOKEN_ENV} (it replaces [http] token): must be at least "
                          f"{MIN_TOKEN_CHARS} characters")  # fmt: skip
    if url := os.environ.get(REDIS_URL_ENV):
        try:
            redis["file_url"] = redis.get("url", "")
            redis["url"], redis["url_from"] = check_redis_url(url), f"${REDIS_URL_ENV}"
        except ValueError as exc:  # (its messages never quote the URL)
            raise ConfigError(f"${REDIS_URL_ENV} (it replaces [redis] url): {exc}") from None
