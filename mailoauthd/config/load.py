"""
Reading a configuration: `load()` reads the file, `parse()` checks the TOML and builds
the Config. `parse()` is pure and collects every problem before raising one
ConfigProblems, so a person fixes the whole file in one pass.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mailoauthd.config import build
from mailoauthd.config import values as v
from mailoauthd.config.model import Config, DaemonSettings
from mailoauthd.config.problems import ConfigProblems, Problems, got
from mailoauthd.config.schema import DAEMON_KEYS, TABLES, read_table, unknown_key


def _table(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name)
    return value if isinstance(value, dict) else {}  # not a table: reported by parse()


def _top_level(problems: Problems, document: Mapping[str, Any]) -> None:
    """Every top-level name is a known table."""
    for name, value in document.items():
        if name in TABLES and not isinstance(value, dict):
            problems.add(name, None, f"must be a table {got(value, show=False)}")
        elif name not in TABLES and not isinstance(value, dict):
            problems.add(None, name, unknown_key(name, {}, {}))
        elif name not in TABLES:
            close = difflib.get_close_matches(name, TABLES, 1)
            hint = (
                f"did you mean '{close[0]}'?" if close else "expected one of: " + ", ".join(TABLES)
            )
            problems.add(name, None, f"unknown table; {hint}")


def _entries(problems: Problems, document: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The named tables under [providers] or [accounts] (None if not a table), names checked."""
    tables = _table(document, kind)
    for name, raw in tables.items():
        if not isinstance(raw, dict):
            # Show no value: a key misplaced here may well be the client secret.
            written = f"written [{kind}.{name}] {got(raw, show=False)}"
            problems.add(kind, name, f"must be a table, {written}")
        elif not v.NAME_PATTERN.fullmatch(name):
            rule = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            problems.add(kind, repr(name), f"a name must be {rule}; it becomes a file name")
    return {name: raw if isinstance(raw, dict) else None for name, raw in tables.items()}


def _daemon(problems: Problems, document: Mapping[str, Any]) -> DaemonSettings:
    before = len(problems.lines)
    values = read_table(problems, "daemon", _table(document, "daemon"), DAEMON_KEYS)
    return DaemonSettings(**values) if len(problems.lines) == before else DaemonSettings()


def parse(text: str, *, source: str, base_dir: Path | None = None) -> Config:
    """
    Check a configuration and turn it into a Config; pure, no file or process I/O.

    Args:
        text: the TOML document.
        source: names the file in messages; becomes Config.source.
        base_dir: for relative client_secret_file paths; by default the directory of `source`.

    Raises:
        ConfigProblems: every problem, one a line; also as its `problems` attribute.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblems([f"{source}: not valid TOML: {exc}"]) from None
    problems = Problems(source)
    _top_level(problems, document)
    daemon = _daemon(problems, document)
    base = Path(source).parent if base_dir is None else base_dir
    store = build.build_store(problems, _table(document, "store"), base)
    providers = {
        name: None if raw is None else build.build_provider(problems, name, raw, base)
        for name, raw in _entries(problems, document, "providers").items()
    }
    accounts = {
        name: None
        if raw is None
        else build.build_account(problems, name, raw, daemon, providers, base)
        for name, raw in _entries(problems, document, "accounts").items()
    }
    proxy = build.build_proxy(problems, _table(document, "proxy"))
    if problems.lines:
        raise ConfigProblems(problems.lines)
    return Config(
        source=source,
        daemon=daemon,
        proxy=proxy,
        store=store,
        providers=MappingProxyType({name: p for name, p in providers.items() if p}),
        accounts=MappingProxyType({name: a for name, a in accounts.items() if a}),
        warnings=tuple(problems.warnings),
    )


def load(path: Path) -> Config:
    """
    Read a configuration file and parse it; relative secret paths are relative to its directory.

    Args:
        path: the file.

    Raises:
        ConfigProblems: the file cannot be read, or `parse` found problems.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        decoding = isinstance(exc, UnicodeDecodeError)
        why = f"not UTF-8 text ({exc})" if decoding else getattr(exc, "strerror", None) or exc
        hint = (
            "create it ('mailoauthd example-config' prints an annotated example) or pass --config"
        )
        missing = isinstance(exc, FileNotFoundError)
        message = f"{path}: cannot read the configuration: {why}"
        raise ConfigProblems([message], hint=hint if missing else None) from exc
    return parse(text, source=str(path), base_dir=path.absolute().parent)
