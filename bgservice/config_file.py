"""Reading ``service.config``: its text (a regular file, UTF-8), and ``Reader``, which
validates the parsed tables with the checks of bgservice.config_checks and names the key
and its line in every error."""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bgservice.config_checks import Check, shown
from bgservice.errors import ConfigError, did_you_mean

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


# A table header, [name] or [[name]], its name as written (dotted, quoted parts and all).
_HEADER = re.compile(r"\s*\[\[?((?:[^\]\"']|\"[^\"]*\"|'[^']*')+)\]\]?")
_PART = re.compile(r"\s*(\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|[A-Za-z0-9_-]+)\s*(\.|$)")


def _part(name: str) -> str:
    """A regular expression for one key part named ``name``, as TOML may spell it."""
    bare = re.escape(name)
    return rf"(?:{bare}|\"{bare}\"|'{bare}')"


def _parts(dotted: str) -> tuple[str, ...]:
    """``queue . "extra"`` -> ("queue", "extra"): a dotted key's parts, quotes taken off
    (escapes inside "..." are kept as written: names needing them are not ours)."""
    parts, at = [], 0
    while at < len(dotted) and (found := _PART.match(dotted, at)):
        quoted = found.group(2) if found.group(2) is not None else found.group(3)
        parts.append(quoted if quoted is not None else found.group(1))
        at = found.end()
    return tuple(parts)


def _lines(text: str) -> Iterator[tuple[int, str, tuple[str, ...] | None]]:
    """Each line of a TOML text, numbered from 1, with the parts of the table it is the
    header of ([queue], [[listen]]), None for any other line."""
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        yield number, line, _parts(header.group(1)) if header else None


_TOKEN = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|#[^\n]*|[][{}]")


def _inline_tables(text: str) -> list[tuple[int, int]]:
    """Where the inline tables of the array opening ``text`` (``name = [{...}, ...]``)
    start and end; brackets in strings and comments do not count."""
    spans, depth, start = [], 0, 0
    for token in _TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            start = token.start() if char == "{" and depth == 2 else start
        elif char in "]}":
            depth -= 1
            if char == "}" and depth == 1:
                spans.append((start, token.end()))
            if depth == 0:
                break
    return spans


def read_config(path: Path) -> str:
    """The file's text. Opened without blocking and refused unless a regular file: a FIFO
    once hung the start with no word, waiting for a writer; a device may never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(mode := os.fstat(fd).st_mode):  # (before fdopen: it refuses a folder)
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ConfigError(f"{path}: is {kind}, not a config file (a regular file)")
    with os.fdopen(fd, "rb") as file:
        try:
            return file.read().decode("utf-8-sig")  # (a BOM, as Windows editors save)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None



_TWICE = re.compile(r"Cannot declare (\(.*\)) twice \(at line (\d+), column \d+\)")
_OVERWRITE = re.compile(r"Cannot overwrite a value \(at line (\d+), column \d+\)")


def toml_error(path: Path, text: str, message: str) -> ConfigError:
    """A TOML syntax error (``tomllib``'s ``message``), said as the config's other errors
    are: a table written twice (the README's [http] snippet pasted below the shipped
    file's) read "Cannot declare ('http',) twice (at line 180, column 6)", a Python tuple
    and only the second of the two lines."""
    if found := _TWICE.fullmatch(message):
        parts, line = ast.literal_eval(found.group(1)), int(found.group(2))
        first = _declared(text, parts, line)
        also = f", and at line {first} before it" if first else ""
        return ConfigError(f"{path}: [{'.'.join(parts)}] (line {line}) is declared twice{also}: "
                           "write each table once, its keys together")  # fmt: skip
    if found := _OVERWRITE.fullmatch(message):
        line = int(found.group(1))
        key = text.splitlines()[line - 1].partition("=")[0].strip()
        return ConfigError(f"{path}: {key} (line {line}) is given twice in its table: keep one")
    return ConfigError(f"{path}: {message}")


def _declared(text: str, parts: tuple[str, ...], before: int) -> int | None:
    """The first line before ``before`` that declares the table ``parts``: its header, or
    a top-level key of that name (``http.port = ...``, ``http = {...}``)."""
    top, key = True, re.compile(rf"\s*{_part(parts[0])}\s*[.=]")
    for number, line, header in itertools.takewhile(lambda at: at[0] < before, _lines(text)):
        if header is not None:
            top = False
            if header == parts:
                return number
        elif top and len(parts) == 1 and key.match(line):
            return number
    return None

def original_servers(path: Path, text: str) -> list[Any] | None:
    """The servers of a config in the original's JSON format (``[{"port": ...}, ...]``),
    or None for TOML. Text that can only be JSON (``{`` or ``[{`` first) and does not
    parse is a JSON error, with its line: read as TOML, it was a TOML error about column 2."""
    start = text.lstrip()
    if not start.startswith(("[", "{")) or start.startswith("[["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if start.startswith("{") or re.match(r"\[\s*[{\]]", start):
            raise ConfigError(f"{path}: not valid JSON (the original's format): {exc.msg} "
                              f"(at line {exc.lineno}, column {exc.colno})") from None  # fmt: skip
        return None  # a TOML table header, [queue]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a JSON config is the original's list of servers "
                          '([{"port": 12341}, ...]); service.config is TOML')  # fmt: skip
    return data

class Reader:
    """Validates one parsed file, naming the key and its line in every error."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text

    def fail(self, where: str, key: str, problem: str, table: str = "",
             index: int = 0) -> ConfigError:  # fmt: skip
        line = self.line_of(key, table, index)
        at = f" (line {line})" if line else ""
        return ConfigError(f"{self.path}: {where}{key}{at}: {problem}")

    @staticmethod
    def unknown(key: str, known: Iterable[str], hint: str = "") -> str:
        """An unknown key's problem: the known key it is nearest to first, when one is
        near enough to be a typo (threadz: threads), then all of them."""
        names = sorted(known)
        return f"unknown key{hint}{did_you_mean(key, names)} (known keys: {', '.join(names)})"

    def line_of(self, key: str, table: str, index: int) -> int | None:
        """The line of ``key`` inside the ``index``-th ``[table]``/``[[table]]`` ("": top),
        else of the table where it is written inline or dotted at the top."""
        line = self._key_line(key, table, index)
        if line is None and table:
            line = self._inline_line(key, table, index)
        return self._top_line(key, table) if line is None and table else line

    def _key_line(self, key: str, table: str, index: int) -> int | None:
        """The line of ``key =`` (or ``key.sub =``) under a header naming ``table``, or of
        a header ``[table.key]``; headers and keys as TOML spells them: bare, "quoted" or
        'literal' parts, spaces around the dots."""
        key_re = re.compile(rf"\s*{_part(key)}\s*[.=]")
        current: tuple[str, ...] = ()
        seen: dict[tuple[str, ...], int] = {}
        for number, line, header in _lines(self.text):
            if header is not None:
                current = header
                seen[current] = seen.get(current, -1) + 1
                if current[:1] == (key,) and not table:  # a table of that name: its header
                    return number
                if current[:2] == (table, key) and seen.get((table,), 0) == index:
                    return number  # [queue.extra]: the table's unknown key "extra"
            elif current == (table,) and seen[current] == index and key_re.match(line):
                return number
            elif not current and not table and key_re.match(line):
                return number
        return None

    def _inline_line(self, key: str, table: str, index: int) -> int | None:
        """In ``table = [{...}, {...}]`` at the top, the line of ``key`` in the
        ``index``-th inline table (its opening brace's line if the key is not found)."""
        start = self._top_line("", table)
        if start is None:
            return None
        text = "\n".join(self.text.splitlines()[start - 1 :])
        if not text.partition("=")[2].lstrip().startswith("["):
            return None  # an inline table, or a value: _top_line's
        opened = _inline_tables(text)
        if index >= len(opened):
            return None
        begin, end = opened[index]
        found = re.search(rf"[{{,]\s*({_part(key)})\s*[.=]", text[begin:end])
        offset = begin + (found.start(1) if found else 0)
        return start + text.count("\n", 0, offset)

    def _top_line(self, key: str, table: str) -> int | None:
        """Where ``table`` is written above every header, inline or dotted: the line of
        ``queue.workers =``, else of ``queue = {...}`` (or ``= 5``, not a table at all)."""
        name = rf"\s*{_part(table)}\s*"
        dotted = re.compile(rf"{name}\.\s*{_part(key)}\s*[.=]")
        whole = re.compile(rf"{name}=")
        lines = enumerate(self.text.splitlines(), 1)
        top = list(itertools.takewhile(lambda item: not item[1].lstrip().startswith("["), lines))
        for pattern in (dotted, whole) if key else (whole,):
            for number, line in top:
                if pattern.match(line):
                    return number
        return None

    def literal(self, key: str, table: str, index: int) -> str:
        """How ``key`` is spelled in the file (its text after ``=``), or "" if not found."""
        line = self._key_line(key, table, index)  # (not an inline table's line)
        if line is None:
            return ""
        return self.text.splitlines()[line - 1].partition("=")[2].strip()

    def table(self, data: Any, checks: dict[str, Check], where: str, table: str = "",
              index: int = 0) -> dict[str, Any]:  # fmt: skip
        if not isinstance(data, dict):
            line = self.line_of(table, "", 0) if table else None
            at = f" (line {line})" if line else ""
            raise ConfigError(f"{self.path}: {where.strip(' .') or 'file'}{at} must be a table")
        out = {}
        for key, value in data.items():
            if key not in checks:
                raise self.fail(where, key, self.unknown(key, checks), table, index)
            try:
                out[key] = checks[key](value)
            except ValueError as exc:
                problem = f"{exc}{shown(key, value, exc)}"
                raise self.fail(where, key, problem, table, index) from None
        return out


def conflicts(
    limits: dict[str, Any], limit_defaults: Any, queue: dict[str, Any], queue_defaults: Any
) -> Iterator[tuple[str, str, str]]:
    """Keys that contradict each other, as (table, key, problem): each key's value as
    given, else its default (``*_defaults``: the Limits and QueueSettings classes)."""
    backoff = queue.get("backoff", queue_defaults.backoff)
    cap = queue.get("backoff_max", queue_defaults.backoff_max)
    if cap < backoff and "backoff_max" in queue:
        yield "queue", "backoff_max", f"must be at least backoff ({backoff:g} s), else " \
            "every retry waits backoff_max and backoff says nothing"
    elif cap < backoff:  # (the key written is the one named, with its line)
        yield "queue", "backoff", f"must be at most backoff_max ({cap:g} s, its default), " \
            "else every retry waits backoff_max: raise backoff_max too"
    if queue.get("workers") == 0 and queue.get("backend") != "redis":
        yield "queue", "workers", 'can be 0 only with backend = "redis"'

    def get(key: str) -> Any:
        return limits.get(key, getattr(limit_defaults, key))

    if get("max_buffered_bytes") < get("max_request_bytes"):
        yield "limits", "max_buffered_bytes", "must be at least max_request_bytes (else a " \
            "request of that size never fits)"
    for key in ("quiet_ms", "quiet_large_ms"):  # (quiet_ms = 20000: every one-shot request
        if get(key) >= get("read_timeout") * 1000:  # ended by a gap got 408 instead)
            yield "limits", key, f"must be shorter than read_timeout ({get('read_timeout'):g}" \
                " s), else a request ended by this gap is answered 408 first"
