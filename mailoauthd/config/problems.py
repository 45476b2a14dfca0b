"""
How the configuration reports what is wrong: every problem collected, one a line,
prefixed with the file, the table and the key; then one ConfigProblems.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailoauthd.errors import ConfigError

# A value longer than this is shown cut, with "...".
_SHOWN_CHARS = 60


class Invalid(Exception):
    """What is wrong with a value, worded to follow '[table] key: '."""


class ConfigProblems(ConfigError):
    """A ConfigError that also lists its problems one by one, as `problems`."""

    def __init__(self, problems: Iterable[str], *, hint: str | None = None) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems), hint=hint)


def _kind(value: object) -> str:
    kinds = {bool: "a bool", int: "an int", float: "a float", str: "a str", dict: "a table"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def shown(value: object) -> str:
    """A value as TOML-ish text and its kind, e.g. "'x', a str"; long values cut."""
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{_clip(text)}, {_kind(value)}"


def got(value: object, *, show: bool = True) -> str:
    """ "(got 'x', a str)"; with show=False only the kind, for secrets."""
    return f"(got {shown(value)})" if show else f"(got {_kind(value)})"


class Problems:
    """Problems and warnings, each prefixed with the file, the table and the key."""

    def __init__(self, source: str) -> None:
        self.source, self.lines, self.warnings = source, list[str](), list[str]()

    def add(self, table: str | None, key: str | None, problem: str, *, warn: bool = False) -> None:
        where = " ".join(part for part in (table and f"[{table}]", key) if part)
        (self.warnings if warn else self.lines).append(f"{self.source}: {where}: {problem}")
