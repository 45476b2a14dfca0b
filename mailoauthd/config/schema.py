"""
The schema: every table's keys declared once, each with the converter that checks it
and the function that writes it back. A new key is one entry here plus a dataclass
field of the same name (model.py); the man page mailoauthd.toml(5) is generated from
`TABLES`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mailoauthd import presets
from mailoauthd.config import values as v
from mailoauthd.config.model import Config, StoreSettings
from mailoauthd.config.problems import Invalid, Problems, got

# What other tools (pizauth, mutt_oauth2.py, Google's client_secret.json) call our keys.
_RENAMED = {
    "auth_uri": "authorization_endpoint",
    "token_uri": "token_endpoint",
    "auth_uri_fields": "authorize_params",
    "devicecode_endpoint": "device_authorization_endpoint",
    "login_hint": "username",
}


@dataclass(frozen=True, slots=True)
class Key:
    """How one key is checked, and written back from the field of the same name."""

    convert: Callable[[Any], Any]
    dump: Callable[[Any], Any] | None = v.same  # None: written by hand (the secret keys)
    required: str | None = None  # what to write there, said when it is missing


_DURATION_KEY = Key(v.duration, v.dump_duration)
DAEMON_KEYS = {
    "refresh_interval": Key(v.positive_duration, v.dump_duration),
    "refresh_before": _DURATION_KEY,
    "refresh_spread": _DURATION_KEY,
    "max_concurrent_refreshes": Key(v.positive_int),
    "request_timeout": Key(v.positive_duration, v.dump_duration),
    "min_validity": _DURATION_KEY,
    "socket": Key(v.socket_path, str),
    "state_dir": Key(v.absolute_path, str),
    "log_format": Key(v.one_of("auto", "json", "console")),
    "log_level": Key(v.one_of("debug", "info", "warning", "error")),
    "admin_group": Key(v.principal),
    "unhealthy_after": Key(v.positive_duration, v.dump_duration),
    "notify_command": Key(v.argv, list),
    "notify_interval": Key(v.positive_duration, v.dump_duration),
}
PROVIDER_KEYS = {
    "preset": Key(v.one_of(*v.PRESETS)),
    "client_id": Key(v.text, required="the client (application) ID of the app registration"),
    "client_secret": Key(v.inline_secret, None),
    "client_secret_file": Key(v.secret_file, None),
    "client_secret_command": Key(v.argv, None),
    "scopes": Key(v.scopes, list),
    "tenant": Key(v.tenant),
    "cloud": Key(v.one_of(*v.CLOUDS)),
    "issuer": Key(v.url),
    **{key: Key(v.url) for key in presets.ENDPOINT_KEYS},
    "token_auth_method": Key(v.one_of("client_secret_post", "client_secret_basic")),
    "authorize_params": Key(v.params, dict),
    "redirect_port": Key(v.port),
    "testing": Key(v.flag),
    "refresh_token_max_age": Key(v.positive_duration, v.dump_duration),
    "refresh_token_max_idle": Key(v.positive_duration, v.dump_duration),
    "default_expires_in": Key(v.positive_duration, v.dump_duration),
}
ACCOUNT_KEYS = {
    "provider": Key(v.text, lambda p: p.name, "the name of a [providers.NAME] table ({defined})"),
    "username": Key(v.text),
    "flow": Key(v.one_of(*v.FLOWS)),
    "scopes": Key(v.scopes, list),
    "refresh_before": _DURATION_KEY,
    "min_validity": _DURATION_KEY,
    "allow_users": Key(v.principals, list),
    "allow_groups": Key(v.principals, list),
    "imap_server": Key(v.server),
    "smtp_server": Key(v.server),
    "imap_security": Key(v.one_of(*v.MAIL_SECURITY)),
    "smtp_security": Key(v.one_of(*v.MAIL_SECURITY)),
    "tls_ca_file": Key(v.absolute_path, str),
    "token_file": Key(v.absolute_path, str),
    "token_file_owner": Key(v.principal),
    "token_file_group": Key(v.principal),
    "token_file_mode": Key(v.file_mode, lambda mode: f"{mode:04o}"),
    "notify_command": Key(v.argv, list),
    "notify_interval": Key(v.positive_duration, v.dump_duration),
    "proxy_password_file": Key(v.secret_file, None),
    "proxy_password_command": Key(v.argv, None),
    "pop3_server": Key(v.server),
    "pop3_security": Key(v.one_of(*v.MAIL_SECURITY)),
    "socketmap_keys": Key(v.socketmap_keys, list),
}
PROXY_KEYS = {
    "imap": Key(v.listener),
    "pop3": Key(v.listener),
    "smtp": Key(v.listener),
    "socketmap": Key(v.socket_path, str),
    "tls_certificate_file": Key(v.absolute_path, str),
    "tls_key_file": Key(v.absolute_path, str),
}


def _endpoints(value: object) -> tuple[str, ...]:
    """etcd's client URLs: https://, or http:// to loopback (as for every URL we call)."""
    if not isinstance(value, list) or not value:
        raise Invalid(
            f"must be a non-empty list of URLs, e.g. ['https://10.0.0.1:2379'] {got(value)}"
        )
    return tuple(v.url(item) for item in value)


def _prefix(value: object) -> str:
    """Where the fleet's keys live in etcd: one path, its own, ending in '/'."""
    text = v.text(value)
    if not text.endswith("/") or any(c.isspace() or c == "\0" for c in text):
        raise Invalid(
            f"must be a key prefix ending in '/', without spaces, e.g. '/mailoauthd/' {got(value)}"
        )
    return text


def _lease_ttl(value: object) -> timedelta:
    """Whole seconds (etcd's unit), at least MIN_LEASE_TTL."""
    span = v.duration(value)
    if span.total_seconds() < MIN_LEASE_TTL or span.total_seconds() % 1:
        raise Invalid(f"must be whole seconds, at least {MIN_LEASE_TTL} s {got(value)}")
    return span


# 2 s: the lease is renewed every third of its TTL, and a renewal must fit in a third.
MIN_LEASE_TTL = 2
STORE_KEYS = {
    "backend": Key(v.one_of("files", "etcd")),
    "encryption_key_file": Key(v.secret_file, str),
    "encryption_key_command": Key(v.argv, list),
    "endpoints": Key(_endpoints, list),
    "prefix": Key(_prefix),
    "ca_file": Key(v.secret_file, str),
    "cert_file": Key(v.secret_file, str),
    "key_file": Key(v.secret_file, str),
    "username": Key(v.text),
    "password_file": Key(v.secret_file, str),
    "lease_ttl": Key(_lease_ttl, v.dump_duration),
}
# The fleet backend's keys (docs/fleet.md): refused with backend "files".
ETCD_KEYS = ("endpoints prefix ca_file cert_file key_file username password_file lease_ttl").split()
TABLES = {
    "daemon": ("[daemon]", DAEMON_KEYS),
    "proxy": ("[proxy]", PROXY_KEYS),
    "store": ("[store]", STORE_KEYS),
    "providers": ("a [providers.NAME] table", PROVIDER_KEYS),
    "accounts": ("an [accounts.NAME] table", ACCOUNT_KEYS),
}


def unknown_key(key: str, keys: Mapping[str, Key], homes: Mapping[str, str]) -> str:
    name = _RENAMED.get(key, key)
    called = f"mailoauthd calls this '{name}'" if name != key else ""
    if called and name in keys:
        return f"unknown key; {called}"
    if places := [homes.get(t, home) for t, (home, known) in TABLES.items() if name in known]:
        called += ", and " if called else ""
        return f"unknown key here; {called}it belongs in {' or '.join(places)}"
    if close := difflib.get_close_matches(key, keys, 1):
        return f"unknown key; did you mean '{close[0]}'?"
    if not keys:
        return "unknown key; settings go in [daemon], [providers.NAME] or [accounts.NAME]"
    return f"unknown key; expected one of: {', '.join(keys)}"


def read_table(
    problems: Problems,
    table: str,
    raw: Mapping[str, object],
    keys: Mapping[str, Key],
    homes: Mapping[str, str] | None = None,
    defined: str = "",
) -> dict[str, Any]:
    """Convert a table's keys; record the unknown, invalid and missing ones."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key not in keys:
                raise Invalid(unknown_key(key, keys, homes or {}))
            values[key] = keys[key].convert(value)
        except Invalid as exc:
            problems.add(table, key, str(exc))
    for key, spec in keys.items():
        if spec.required and key not in raw:
            expected = spec.required.format(defined=defined)
            problems.add(table, key, f"required key is missing; expected {expected}")
    return values


def _dump_store(store: StoreSettings) -> dict[str, Any]:
    """[store]'s keys that differ from the defaults (the etcd ones are refused with 'files')."""
    table, default = _dump(store, STORE_KEYS), _dump(StoreSettings(), STORE_KEYS)
    return {key: value for key, value in table.items() if default.get(key) != value}


def _dump(obj: object, keys: Mapping[str, Key]) -> dict[str, Any]:
    table = {}
    for key, spec in keys.items():
        if spec.dump and (value := getattr(obj, key)) is not None and value != {}:
            table[key] = spec.dump(value)
    return table


def to_mapping(config: Config) -> dict[str, Any]:
    """
    The configuration as plain data for tomli_w, with every default written out.

    parse(tomli_w.dumps(to_mapping(c)), source=c.source) == c. An inline client
    secret is written in the clear: it goes back into a config file.

    Args:
        config: what to write.
    """
    providers = {}
    for name, provider in config.providers.items():
        providers[name] = _dump(provider, PROVIDER_KEYS)
        if (secret := provider.client_secret) and secret.inline is not None:
            providers[name]["client_secret"] = secret.inline.reveal()
        elif secret:
            providers[name][secret.key] = str(secret.file or "") or list(secret.command or ())
    accounts = {name: _dump(a, ACCOUNT_KEYS) for name, a in config.accounts.items()}
    for name, account in config.accounts.items():
        if (password := account.proxy_password) is not None and password.file is not None:
            accounts[name]["proxy_password_file"] = str(password.file)
        elif password is not None:
            accounts[name]["proxy_password_command"] = list(password.command or ())
    document = {
        "daemon": _dump(config.daemon, DAEMON_KEYS),
        "proxy": _dump(config.proxy, PROXY_KEYS),
        "store": _dump_store(config.store),
        "providers": providers,
        "accounts": accounts,
    }
    return {key: table for key, table in document.items() if table}
