"""
From checked keys to settings: each table's values with its preset's filled in, and the
rules between keys, one small function each. A rule returns (key, problem) pairs; the
builders record them, so every problem of a file is reported in one pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mailoauthd import hostport, presets
from mailoauthd.config import provider_checks
from mailoauthd.config.model import Account, DaemonSettings, Provider, ProxySettings, StoreSettings
from mailoauthd.config.problems import Problems
from mailoauthd.config.schema import (
    ACCOUNT_KEYS,
    ETCD_KEYS,
    PROVIDER_KEYS,
    PROXY_KEYS,
    STORE_KEYS,
    read_table,
)
from mailoauthd.config.secrets import SecretSource, secret_path
from mailoauthd.flows import Flow

_SECRET_KEYS = ("client_secret", "client_secret_file", "client_secret_command")
Rule = Iterator[tuple[str, str]]


def _at_most_one(
    problems: Problems, table: str, raw: Mapping[str, object], keys: tuple[str, ...]
) -> None:
    if len(given := [key for key in keys if key in raw]) > 1:
        problems.add(table, given[1], f"set only one of {', '.join(given)}")


def _only(has: Callable[[presets.Preset], object]) -> str:
    """The presets with a feature, for "only the 'microsoft' preset has one"."""
    names = [f"'{p.name}'" for p in presets.PRESETS.values() if has(p)]
    return f"only the {' or '.join(names)} preset{'s' if len(names) > 1 else ''}"


# --- [providers.NAME] --------------------------------------------------------------------


def _client_secret(
    problems: Problems, table: str, values: dict[str, Any], base_dir: Path
) -> SecretSource | None:
    """The profile's client secret, taken out of `values`; an inline one is warned about."""
    if "client_secret" in values:
        instead = "prefer client_secret_file or client_secret_command"
        problems.add(table, "client_secret", f"is inline in the config file; {instead}", warn=True)
        return SecretSource(inline=values.pop("client_secret"))
    if path := values.pop("client_secret_file", ""):
        return SecretSource(file=secret_path(path, base_dir))
    if "client_secret_command" in values:
        return SecretSource(command=values.pop("client_secret_command"))
    return None


def _tenant_and_cloud(preset: presets.Preset, raw: Mapping[str, object]) -> Rule:
    for key in ("tenant", "cloud"):
        if key in raw and not preset.clouds:
            yield key, f"{_only(lambda p: p.clouds)} has one; this one is '{preset.name}'"


def _testing(preset: presets.Preset, raw: Mapping[str, object]) -> Rule:
    if raw.get("testing") is True and preset.testing_max_age is None:
        only = _only(lambda p: p.testing_max_age)
        yield "testing", f"{only} has it; this one is '{preset.name}'"


def _issuer(preset: presets.Preset, raw: Mapping[str, object]) -> Rule:
    if "issuer" in raw and preset.name != presets.GENERIC:
        why = f"the '{preset.name}' preset knows its endpoints; override single ones instead"
        yield "issuer", f"is for discovery with preset 'generic' only; {why}"


def _generic_endpoints(preset: presets.Preset, raw: Mapping[str, object]) -> Rule:
    if preset.name == presets.GENERIC and not {"token_endpoint", "issuer"} & set(raw):
        need = "a generic provider needs token_endpoint (and authorization_endpoint or"
        need += " device_authorization_endpoint to sign in), or issuer to discover them"
        yield "token_endpoint", f"required key is missing; {need}"


_PROVIDER_RULES = (_tenant_and_cloud, _testing, _issuer, _generic_endpoints)


def _preset_values(preset: presets.Preset, values: dict[str, Any]) -> dict[str, Any]:
    """The profile's values over its preset's: tenant, cloud, endpoints, scopes, limits."""
    if preset.clouds:
        values = {"tenant": preset.default_tenant, "cloud": next(iter(preset.clouds)), **values}
    if values.get("testing") and preset.testing_max_age is not None:
        values = {"refresh_token_max_age": preset.testing_max_age, **values}
    defaults = presets.defaults(preset, values.get("tenant"), values.get("cloud"))
    return {**defaults, **values}


def build_provider(
    problems: Problems, name: str, raw: Mapping[str, object], base_dir: Path
) -> Provider | None:
    """A [providers.NAME] table as a Provider; None when it has problems."""
    table, before = f"providers.{name}", len(problems.lines)
    values = read_table(problems, table, raw, PROVIDER_KEYS)
    if "preset" in raw and "preset" not in values:
        return None  # every default depends on the preset
    preset = presets.PRESETS[values.pop("preset", presets.GENERIC)]
    _at_most_one(problems, table, raw, _SECRET_KEYS)
    secret = _client_secret(problems, table, values, base_dir)
    for rule in _PROVIDER_RULES:
        for key, problem in rule(preset, raw):
            problems.add(table, key, problem)
    for key, problem in provider_checks.provider_problems(preset.name, secret is not None):
        problems.add(table, key, problem, warn=True)
    if len(problems.lines) > before:
        return None
    values = _preset_values(preset, values)
    return Provider(name=name, preset=preset.name, client_secret=secret, **values)


# --- [accounts.NAME] ---------------------------------------------------------------------


def _proxy_password(
    problems: Problems, table: str, raw: Mapping[str, object], values: dict[str, Any], base: Path
) -> None:
    """proxy_password_file or proxy_password_command into values["proxy_password"]."""
    if "proxy_password_file" in raw and "proxy_password_command" in raw:
        both = "set only one of proxy_password_file and proxy_password_command"
        problems.add(table, "proxy_password_command", both)
    if path := values.pop("proxy_password_file", ""):
        # Read like client_secret_file: relative to the file, or from $CREDENTIALS_DIRECTORY.
        values["proxy_password"] = SecretSource(file=secret_path(path, base))
    elif command := values.pop("proxy_password_command", None):
        values["proxy_password"] = SecretSource(command=command)


def _provider_defined(ref: str, providers: Mapping[str, Provider | None]) -> Rule:
    if ref not in providers:
        close = difflib.get_close_matches(ref, providers, 1)
        maybe = f"did you mean '{close[0]}'? " if close else ""
        yield "provider", f"there is no [providers.{ref}] table; {maybe}({_defined(providers)})"


def _username(raw: Mapping[str, object], values: Mapping[str, Any], flow: Flow) -> Rule:
    flow_ok = "flow" not in raw or "flow" in values
    if "username" not in raw and flow != Flow.CLIENT_CREDENTIALS and flow_ok:
        expected = "the mailbox address, e.g. 'alice@example.com' (the SASL user and login hint)"
        yield "username", f"required key is missing; expected {expected}"


def _client_credentials(provider: Provider | None, flow: Flow) -> Rule:
    """A client_credentials account needs a provider that grants it, a secret, a directory."""
    if provider is None or flow != Flow.CLIENT_CREDENTIALS:
        return
    preset, there = presets.PRESETS[provider.preset], f"[providers.{provider.name}]"
    shared = provider.tenant in preset.shared_tenants
    if preset.client_credentials_refused:
        yield "flow", preset.client_credentials_refused
    elif provider.client_secret is None:
        fix = "set client_secret_file or client_secret_command there"
        yield "flow", f"client_credentials needs a client secret; {there} has none; {fix}"
    elif shared and provider.token_endpoint == _preset_token_endpoint(preset, provider):
        fix = f"set tenant in {there} to your directory's domain or ID"
        yield "flow", f"client_credentials needs a directory, not {provider.tenant!r}; {fix}"


def _preset_token_endpoint(preset: presets.Preset, provider: Provider) -> object:
    return presets.defaults(preset, provider.tenant, provider.cloud).get("token_endpoint")


def _default_scopes(provider: Provider, flow: Flow) -> tuple[str, ...]:
    """The profile's scopes; for client_credentials the preset's app-only ones (Microsoft's)."""
    app_only = presets.app_only_scopes(presets.PRESETS[provider.preset], provider.cloud)
    return app_only if flow == Flow.CLIENT_CREDENTIALS and app_only is not None else provider.scopes


def _mail_servers(provider: Provider) -> dict[str, str]:
    servers = presets.mail_servers(presets.PRESETS[provider.preset], provider.cloud)
    if servers is None:
        return {}
    return {"imap_server": servers.imap, "smtp_server": servers.smtp, "pop3_server": servers.pop3}


def _clear_text_to_loopback(values: Mapping[str, Any]) -> Rule:
    for kind in ("imap", "smtp", "pop3"):
        where = values.get(f"{kind}_server")
        host = hostport.parse(where).host if where else ""
        if values.get(f"{kind}_security") == "none" and not hostport.is_loopback(host):
            why = f"a token in the clear is allowed only to {', '.join(hostport.LOOPBACK_HOSTS)}"
            yield f"{kind}_security", f"is 'none' for {host or 'no server'}; {why}"


def _defined(providers: Mapping[str, object]) -> str:
    return f"defined: {', '.join(providers)}" if providers else "none is defined yet"


def _daemon_defaults(daemon: DaemonSettings) -> dict[str, Any]:
    """What an account takes from [daemon] unless it sets its own."""
    return {
        "refresh_before": daemon.refresh_before,
        "min_validity": daemon.min_validity,
        "notify_command": daemon.notify_command,
        "notify_interval": daemon.notify_interval,
    }


def build_account(
    problems: Problems,
    name: str,
    raw: Mapping[str, object],
    daemon: DaemonSettings,
    providers: Mapping[str, Provider | None],
    base_dir: Path = Path("/"),
) -> Account | None:
    """An [accounts.NAME] table as an Account; None when it has problems."""
    table, before = f"accounts.{name}", len(problems.lines)
    ref = given if isinstance(given := raw.get("provider"), str) else ""
    homes = {"providers": f"[providers.{ref}]" if ref in providers else "a [providers.NAME] table"}
    values = read_table(problems, table, raw, ACCOUNT_KEYS, homes, _defined(providers))
    _proxy_password(problems, table, raw, values, base_dir)
    flow = Flow(values.get("flow", Flow.AUTHORIZATION_CODE))
    provider = providers.get(ref)
    rules = [_username(raw, values, flow), _client_credentials(provider, flow)]
    if values.pop("provider", None) is not None:
        rules.insert(0, _provider_defined(ref, providers))
    for rule in rules:
        for key, problem in rule:
            problems.add(table, key, problem)
    if len(problems.lines) > before or provider is None:
        return None
    values.setdefault("scopes", _default_scopes(provider, flow))
    for key, problem in provider_checks.account_problems(provider.preset, flow, values["scopes"]):
        problems.add(table, key, problem)
    if len(problems.lines) > before:
        return None
    values = {**_mail_servers(provider), **values}
    for key, problem in _clear_text_to_loopback(values):
        problems.add(table, key, problem)
    values = {**_daemon_defaults(daemon), **values}
    if values["min_validity"] >= values["refresh_before"]:
        why = "mail programs would wait for refreshes; make refresh_before longer"
        problems.add(table, "min_validity", f"is not shorter than refresh_before: {why}", warn=True)
    return Account(name=name, provider=provider, **{**values, "flow": flow})


# --- [proxy] and [store] -----------------------------------------------------------------


def build_proxy(problems: Problems, raw: Mapping[str, object]) -> ProxySettings:
    """The [proxy] table: a TLS certificate and key together, and for any non-loopback listener."""
    values = read_table(problems, "proxy", raw, PROXY_KEYS)
    cert, key = values.get("tls_certificate_file"), values.get("tls_key_file")
    if (cert is None) != (key is None):
        missing = "tls_key_file" if key is None else "tls_certificate_file"
        problem = "required with the other of tls_certificate_file and tls_key_file"
        problems.add("proxy", missing, problem)
    for kind in ("imap", "pop3", "smtp"):
        where = values.get(kind)
        if where and not hostport.is_loopback(hostport.parse(where).host) and cert is None:
            why = "a listener others can reach must offer STARTTLS: set tls_certificate_file"
            problem = f"{where!r} is not a loopback address; {why} and tls_key_file"
            problems.add("proxy", kind, problem)
    return ProxySettings(**values)


def build_store(problems: Problems, raw: Mapping[str, object], base_dir: Path) -> StoreSettings:
    """The [store] table: the etcd keys with backend 'etcd' only, and together where they pair."""
    before = len(problems.lines)
    values = read_table(problems, "store", raw, STORE_KEYS)
    _at_most_one(problems, "store", raw, ("encryption_key_file", "encryption_key_command"))
    for key in ("encryption_key_file", "ca_file", "cert_file", "key_file", "password_file"):
        if path := values.get(key):
            values[key] = secret_path(path, base_dir)
    for key, problem in _etcd_rules(values.get("backend", "files"), raw):
        problems.add("store", key, problem)
    return StoreSettings(**values) if len(problems.lines) == before else StoreSettings()


def _etcd_rules(backend: str, raw: Mapping[str, object]) -> Rule:
    """The etcd keys: only for backend 'etcd', endpoints required, certificate and key together."""
    if backend != "etcd":
        for key in [key for key in raw if key in ETCD_KEYS]:
            yield key, "is for backend = 'etcd' only (docs/fleet.md)"
        return
    if "endpoints" not in raw:
        yield "endpoints", "required with backend = 'etcd': etcd's client URLs"
    for one, other in (("cert_file", "key_file"), ("username", "password_file")):
        if (one in raw) != (other in raw):
            missing = other if one in raw else one
            yield missing, f"required with {one if one in raw else other}: they go together"
