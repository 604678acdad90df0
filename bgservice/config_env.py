"""The secrets the environment may give instead of the config file, so that the file can
be read by more than the service (a deploy's repository, its group) without them:
``$BGSERVICE_HTTP_TOKEN`` for ``[http] token`` and ``$BGSERVICE_REDIS_URL`` for ``[redis]
url`` (a URL holding a password). Each replaces the file's key when set and not empty, and
is checked as the key is; an error names the variable, never its value."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from bgservice.config_checks import check_redis_url
from bgservice.config_file import original_servers, read_config
from bgservice.errors import ConfigError
from bgservice.http.tokens import MIN_TOKEN_CHARS, TOKEN_ENV

REDIS_URL_ENV = "BGSERVICE_REDIS_URL"


def apply_env(http: dict[str, Any], redis: dict[str, Any]) -> None:
    """Check ``$BGSERVICE_HTTP_TOKEN`` when the API is on (bgservice.http.tokens reads it
    where it is used) and put ``$BGSERVICE_REDIS_URL`` in ``redis`` (``[redis]`` as read)."""
    token = os.environ.get(TOKEN_ENV)
    if http.get("enabled", False) and token and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"${TOKEN_ENV} (it replaces [http] token): must be at least "
                          f"{MIN_TOKEN_CHARS} characters")  # fmt: skip
    if url := os.environ.get(REDIS_URL_ENV):
        try:
            redis["url"], redis["url_from"] = check_redis_url(url), f"${REDIS_URL_ENV}"
        except ValueError as exc:  # (its messages never quote the URL)
            raise ConfigError(f"${REDIS_URL_ENV} (it replaces [redis] url): {exc}") from None


def file_redis_url(path: Path) -> str:
    """The ``[redis] url`` the file itself holds ("" if none, or unreadable now): where
    $BGSERVICE_REDIS_URL replaced it in the settings, a password written in it is still
    there for every reader of the file (cli.py warns of it)."""
    try:
        text = read_config(path)
        data = tomllib.loads(text) if original_servers(path, text) is None else {}
    except (ConfigError, tomllib.TOMLDecodeError):
        return ""
    redis = data.get("redis")
    url = redis.get("url") if isinstance(redis, dict) else None
    return url if isinstance(url, str) else ""
