"""
The configuration: TOML in, frozen typed objects out.

This face is what the rest of mailoauthd uses (`config.load`, `config.Config`, ...).
Inside, one module per concern, imports pointing down the list:

- problems.py  ConfigProblems and the collector of "file: [table] key: problem" lines
- secrets.py   SecretSource: a client secret inline, in a file or from a command; reading it
- values.py    the converters, one per kind of value (durations, URLs, scopes, paths, ...)
- model.py     the frozen settings: DaemonSettings, Provider, Account, Config, ...
- schema.py    every table's keys declared once (`TABLES`): converter and writer-back
- build.py     tables into settings, presets filled in, one function per rule between keys
- load.py      `load()` and `parse()`

Provider facts (endpoints, clouds, mail servers) come from mailoauthd.presets.
"""

from mailoauthd.config.load import load, parse
from mailoauthd.config.model import (
    Account,
    Config,
    DaemonSettings,
    Provider,
    ProxySettings,
    StoreSettings,
)
from mailoauthd.config.problems import ConfigProblems
from mailoauthd.config.schema import TABLES, to_mapping
from mailoauthd.config.secrets import SecretSource
from mailoauthd.config.values import (
    FLOWS,
    NAME_PATTERN,
)

__all__ = [
    "FLOWS",
    "NAME_PATTERN",
    "TABLES",
    "Account",
    "Config",
    "ConfigProblems",
    "DaemonSettings",
    "Provider",
    "ProxySettings",
    "SecretSource",
    "StoreSettings",
    "load",
    "parse",
    "to_mapping",
]
