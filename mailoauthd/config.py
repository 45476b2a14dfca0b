"""
The configuration: TOML in, frozen typed objects out; provider presets; client secrets.

`parse()` is pure and collects every problem before raising one ConfigError, so a
person fixes the whole file in one pass; `load()` only reads the file. Each table's
keys are declared once (`_DAEMON_KEYS`, `_PROVIDER_KEYS`, `_ACCOUNT_KEYS`) with the
converter that checks them and the function that writes them back: a new key is one
entry there plus a dataclass field of the same name.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from mailoauthd import presets, provider_checks
from mailoauthd.errors import ConfigError
from mailoauthd.secret import Secret

# Names become file names in the state directory and words in mail programs' commands.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PRESETS = tuple(presets.PRESETS)
FLOWS = ("authorization_code", "device_code", "client_credentials")
# How `mailoauth test` reaches a mail server: implicit TLS, STARTTLS, or in the clear
# ("none", allowed to loopback addresses only: a test server on this machine).
MAIL_SECURITY = ("tls", "starttls", "none")
# 30 s: a password manager may wait for a GPG agent or a hardware key's touch;
# beyond that nobody is coming, and the daemon must not hang.
SECRET_COMMAND_TIMEOUT_SECONDS = 30
# sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Every preset's clouds (Microsoft's today), and the tenants that name no single directory.
_CLOUDS = tuple(dict.fromkeys(name for p in presets.PRESETS.values() for name in p.clouds))
_SHARED_TENANTS = tuple(t for p in presets.PRESETS.values() for t in p.shared_tenants)
_SECRET_KEYS = ("client_secret", "client_secret_file", "client_secret_command")
_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_DOMAIN = re.compile(r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}")
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HELP = 'a duration such as "90s", "3m", "1h30m" or "2d", or a number of seconds'
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# mailoauthd sets these for every sign-in; overriding them would break the flow or
# its defences against forged redirects.
_RESERVED_PARAMS = (
    "response_type client_id redirect_uri scope state code_challenge code_challenge_method nonce"
).split()
# What other tools (pizauth, mutt_oauth2.py, Google's client_secret.json) call our keys.
_RENAMED = {
    "auth_uri": "authorization_endpoint",
    "token_uri": "token_endpoint",
    "auth_uri_fields": "authorize_params",
    "devicecode_endpoint": "device_authorization_endpoint",
    "login_hint": "username",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretSource:
    """Where a client secret comes from: exactly one of inline, file and command."""

    inline: Secret | None = None
    file: Path | None = None  # "$VAR" and "${VAR}" are expanded when read
    command: tuple[str, ...] | None = None  # argv, never a shell string

    def __post_init__(self) -> None:
        if [self.inline, self.file, self.command].count(None) != 2:
            raise ValueError("a SecretSource needs exactly one of inline, file and command")

    @property
    def key(self) -> str:
        """The config key this came from, for `read(where=...)`."""
        if self.inline is not None:
            return "client_secret"
        return "client_secret_file" if self.file is not None else "client_secret_command"

    def read(self, *, where: str, env: Mapping[str, str] | None = None) -> Secret:
        """
        The secret: inline, or the file's content or the command's stdout, stripped.

        Args:
            where: the key for error messages, e.g. "providers.work.client_secret_file".
            env: for $VAR in the file path; the process environment by default.

        Raises:
            ConfigError: naming `where`, the file or program and the OS error or exit
                status; never the secret nor the command's output.
        """
        if self.inline is not None:
            return self.inline
        if self.file is not None:
            return _read_secret_file(self.file, where, os.environ if env is None else env)
        assert self.command is not None  # __post_init__ guarantees one source
        return _run_secret_command(self.command, where)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    refresh_interval: timedelta = timedelta(minutes=3)
    refresh_before: timedelta = timedelta(minutes=10)
    refresh_spread: timedelta = timedelta(seconds=30)
    max_concurrent_refreshes: int = 8
    request_timeout: timedelta = timedelta(seconds=30)
    min_validity: timedelta = timedelta(seconds=60)
    socket: Path | None = None  # None: the mode's default
    state_dir: Path | None = None
    log_format: str = "auto"
    log_level: str = "info"
    # System mode: members of this group may manage every account (not read its tokens).
    admin_group: str | int | None = None
    # `mailoauth status --check` fails for an account failing this long. 15 min: past
    # the default refresh_before (10 min), so the last access token has expired by
    # then and mail programs fail; a shorter outage is bridged by that token.
    unhealthy_after: timedelta = timedelta(minutes=15)
    # Run (argv) when an account newly needs a person, and every notify_interval
    # until it is fixed; per account too. 6 h: a few reminders a working day.
    notify_command: tuple[str, ...] | None = None
    notify_interval: timedelta = timedelta(hours=6)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """[store]: where grants are kept, and the key that seals them (mailoauthd/store.py)."""

    backend: str = "files"
    encryption_key_file: Path | None = None  # "$VAR" and "${VAR}" are expanded when read
    encryption_key_command: tuple[str, ...] | None = None  # argv, never a shell string


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    """An OAuth profile, one app registration, with its preset's values filled in."""

    name: str
    preset: str = "generic"
    client_id: str
    client_secret: SecretSource | None = None
    scopes: tuple[str, ...] = ()
    tenant: str | None = None
    cloud: str | None = None
    issuer: str | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    token_auth_method: str = "client_secret_post"  # noqa: S105 (a method's name)
    # Mappings cannot be hashed; leaving them out keeps these objects usable as keys.
    authorize_params: Mapping[str, str] = field(default_factory=_empty, hash=False)
    redirect_port: int | None = None  # None: a random free port for each sign-in
    testing: bool = False  # google: the app is in "testing" status (7-day refresh tokens)
    # Known cut-offs of a refresh token: since it was issued, and since it was last used.
    refresh_token_max_age: timedelta | None = None
    refresh_token_max_idle: timedelta | None = None
    # The lifetime assumed for an access token whose answer names none (no
    # expires_in) and which is no JWT with an `exp` claim: short on purpose.
    default_expires_in: timedelta = timedelta(minutes=15)
    # Not a configuration key: discovery sets it when the issuer's metadata says its
    # authorization responses carry `iss` (RFC 9207), which sign-ins then require.
    authorization_response_iss: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    name: str
    provider: Provider
    username: str | None = None
    flow: str = "authorization_code"
    scopes: tuple[str, ...] = ()
    refresh_before: timedelta = timedelta(minutes=10)
    min_validity: timedelta = timedelta(seconds=60)
    # System mode: who besides root and the daemon's user may have the tokens;
    # user/group names, or numeric ids.
    allow_users: tuple[str | int, ...] = ()
    allow_groups: tuple[str | int, ...] = ()
    # Where `mailoauth test` logs in: "host:port"; the preset's servers by default.
    imap_server: str | None = None
    smtp_server: str | None = None
    # "tls" (implicit), "starttls" or "none" (loopback only); None: tls on 993/465,
    # starttls elsewhere.
    imap_security: str | None = None
    smtp_security: str | None = None
    tls_ca_file: Path | None = None  # trust this CA (a private or self-signed server)
    # The current access token also kept in this file, replaced atomically on each
    # refresh, for programs that read a password file (fetchmail) instead of a command.
    token_file: Path | None = None
    token_file_owner: str | int | None = None
    token_file_group: str | int | None = None
    token_file_mode: int = 0o600
    notify_command: tuple[str, ...] | None = None  # the [daemon] value unless set here
    notify_interval: timedelta = timedelta(hours=6)
    # The proxy (mailoauthd/proxy): the local password its clients log in with
    # (proxy_password_file or proxy_password_command), POP3's upstream, and the
    # extra keys the Postfix socketmap answers for this account.
    proxy_password: SecretSource | None = None
    pop3_server: str | None = None
    pop3_security: str | None = None
    socketmap_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """[proxy]: local IMAP/POP3/SMTP listeners ("host:port") and the Postfix socketmap."""

    imap: str | None = None
    pop3: str | None = None
    smtp: str | None = None
    socketmap: Path | None = None
    tls_certificate_file: Path | None = None
    tls_key_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    providers: Mapping[str, Provider] = field(default_factory=_empty, hash=False)
    accounts: Mapping[str, Account] = field(default_factory=_empty, hash=False)
    # Advice about the configuration, not part of it.
    warnings: tuple[str, ...] = field(default=(), compare=False)


class _Invalid(Exception):
    """What is wrong with a value, worded to follow '[table] key: '."""


def _config_error(problems: list[str], *, hint: str | None = None) -> ConfigError:
    error = ConfigError("\n".join(problems), hint=hint)
    # errors.py declares no such attribute, and mypy refuses to assign undeclared ones.
    setattr(error, "problems", tuple(problems))  # noqa: B010
    return error


def _got(value: object, *, show: bool = True) -> str:
    kinds = {bool: "a bool", int: "an int", float: "a float", str: "a str", dict: "a table"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"(got {shown}, {kind})" if show else f"(got {kind})"


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a non-empty string {_got(value)}")
    return value


def _one_of(*allowed: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        close = difflib.get_close_matches(value, allowed, 1) if isinstance(value, str) else []
        also = f"; did you mean '{close[0]}'?" if close else ""
        raise _Invalid(f"must be one of {', '.join(map(repr, allowed))} {_got(value)}{also}")

    return convert


def _duration(value: object) -> timedelta:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                return timedelta(seconds=value)
        elif isinstance(value, str) and (match := _DURATION.fullmatch("".join(value.split()))):
            if any(match.groups()):
                days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
                return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (OverflowError, ValueError):
        raise _Invalid(f"is too long a duration {_got(value)}") from None
    unit = "; add a unit, e.g. '90s'" if isinstance(value, str) and value.isdigit() else ""
    raise _Invalid(f"must be {_DURATION_HELP} {_got(value)}{unit}")


def _positive_duration(value: object) -> timedelta:
    if not (duration := _duration(value)):
        raise _Invalid(f"must be longer than zero {_got(value)}")
    return duration


def _port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise _Invalid(f"must be a TCP port number from 1 to 65535 {_got(value)}")


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"must be true or false {_got(value)}")


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _Invalid(f"must be a whole number of at least 1 {_got(value)}")


def _absolute_path(value: object) -> Path:
    if "\0" in _text(value) or not Path(str(value)).is_absolute():
        why = "a relative one would depend on where the daemon starts"
        raise _Invalid(f"must be an absolute path {_got(value)}; {why}")
    return Path(str(value))


def _socket_path(value: object) -> Path:
    if (size := len(os.fsencode(path := _absolute_path(value)))) > MAX_SOCKET_PATH_BYTES:
        raise _Invalid(f"is {size} bytes long; socket paths may have {MAX_SOCKET_PATH_BYTES}")
    return path


def _url(value: object) -> str:
    parts = urlsplit(_text(value))
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number
        port_ok = False
    if parts.scheme not in ("https", "http") or not parts.hostname or not port_ok:
        raise _Invalid(f"must be an https:// URL {_got(value)}")
    if parts.fragment or any(character.isspace() for character in str(value)):
        raise _Invalid(f"must be a URL without spaces or a #fragment {_got(value)}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        why = "plain http is allowed only to 127.0.0.1, [::1] or localhost"
        raise _Invalid(f"must use https {_got(value)}; {why}")
    return str(value)


def _scopes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of strings {_got(value)}")
    for number, scope in enumerate(value, start=1):
        if not isinstance(scope, str) or not scope:
            raise _Invalid(f"must be a list of strings (item {number} is {_got(scope)[5:-1]})")
        if any(character.isspace() for character in scope):
            raise _Invalid(f"{scope!r} contains whitespace; list each scope as its own string")
        if value.index(scope) < number - 1:
            raise _Invalid(f"{scope!r} is listed twice")
    return tuple(value)


def _tenant(value: object) -> str:
    tenant = _text(value)
    if tenant in _SHARED_TENANTS or _GUID.fullmatch(tenant) or _DOMAIN.fullmatch(tenant):
        return tenant
    expected = "'common', 'organizations', 'consumers', a directory ID (GUID) or a domain"
    raise _Invalid(f"must be {expected} such as 'contoso.onmicrosoft.com' {_got(value)}")


def _params(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of strings {_got(value)}")
    for name, param in value.items():
        if name in _RESERVED_PARAMS:
            why = "from client_id, scopes and the flow"
            raise _Invalid(f"'{name}' is set by mailoauthd itself ({why}); remove it")
        if not name or not isinstance(param, str) or not param.strip():
            raise _Invalid(f"must map names to non-empty strings ({name!r} is {_got(param)})")
    return MappingProxyType(dict(value))


# The three secret keys never echo a value, not even a mistyped one.
def _inline_secret(value: object) -> Secret:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a non-empty string {_got(value, show=False)}")
    return Secret(value)


def _secret_file(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _Invalid(f"must be a non-empty path {_got(value, show=False)}")
    if value.startswith("~"):
        raise _Invalid("'~' is not expanded; write $HOME/..., or a path relative to this file")
    return value


def _argv(value: object) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and value[0] and isinstance(value[0], str)) or any(
        not isinstance(word, str) or "\0" in word for word in value
    ):
        shell = ", not a shell command" if isinstance(value, str) else ""
        example = "['pass', 'show', 'mail/client-secret']"
        raise _Invalid(f"must be a list of strings{shell}: program and arguments, e.g. {example}")
    return tuple(value)


# ids are 32-bit; (uid_t)-1 means "no change" to chown and setreuid, never a user.
_MAX_ID = 2**32 - 2


def _principal(value: object) -> str | int:
    """A user or group: a name, or a numeric id (an int, or a string of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) <= _MAX_ID:
        return int(value)
    if (
        isinstance(value, str)
        and value
        and len(value) <= 256
        and not any(c.isspace() or c in ":/\0" for c in value)
    ):
        return value
    raise _Invalid(f"must be a user or group name, or a numeric id {_got(value)}")


def _principals(value: object) -> tuple[str | int, ...]:
    if not isinstance(value, list):
        raise _Invalid(
            f"must be a list of names or numeric ids, e.g. ['alice', 1001] {_got(value)}"
        )
    found: list[str | int] = []
    for number, item in enumerate(value, start=1):
        try:
            principal = _principal(item)
        except _Invalid as exc:
            raise _Invalid(f"item {number} {exc}") from None
        if principal in found:
            raise _Invalid(f"{item!r} is listed twice")
        found.append(principal)
    return tuple(found)


def _server(value: object) -> str:
    """A mail server as "host:port" ("[::1]:993" for an IPv6 address)."""
    host, _, port = _text(value).rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare or any(c.isspace() or c in "/[]" for c in bare) or not port.isdigit():
        raise _Invalid(f"must be 'host:port', e.g. 'outlook.office365.com:993' {_got(value)}")
    if not 1 <= int(port) <= 65535:
        raise _Invalid(f"has no valid port number (1 to 65535) {_got(value)}")
    return str(value)


def _file_mode(value: object) -> int:
    """Permission bits: 0o640 in TOML, or a string of octal digits such as "0640"."""
    mode = value
    if isinstance(value, str) and value and len(value) <= 4 and set(value) <= set("01234567"):
        mode = int(value, 8)
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777:
        if mode & 0o200 and not mode & 0o400:
            raise _Invalid(f"lets the owner write but not read {_got(value)}")
        if mode & 0o022:
            raise _Invalid(f"lets others than the owner write {_got(value)}; use e.g. '0640'")
        return mode
    raise _Invalid(f"must be permission bits such as '0600' or '0640' (or 0o640) {_got(value)}")


def _listener(value: object) -> str:
    """A proxy listener: "host:port" with an IP address or localhost, "[::1]:1143" for IPv6."""
    text = _server(value)
    host = listener_host(text)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid(f"must name an IP address to listen on {_got(value)}") from None
    if ":" in host and not text.startswith("["):
        raise _Invalid(f"must write an IPv6 address in brackets, e.g. '[::1]:1143' {_got(value)}")
    return text


def listener_host(text: str) -> str:
    """The host of a "host:port" without IPv6 brackets."""
    return text.rpartition(":")[0].removeprefix("[").removesuffix("]")


def is_loopback(text: str) -> bool:
    """Whether a listener "host:port" is on a loopback address."""
    host = listener_host(text)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _socketmap_keys(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(key, str) and key and not any(c.isspace() for c in key) for key in value
    ):
        example = "['[smtp.office365.com]:587', 'smtp.office365.com']"
        raise _Invalid(f"must be a list of strings without spaces, e.g. {example} {_got(value)}")
    return tuple(value)


def _same(value: Any) -> Any:
    return value


def _dump_duration(value: timedelta) -> str | float:
    if value.microseconds:
        return value / timedelta(seconds=1)
    seconds, text = value.days * 86400 + value.seconds, ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        text += f"{count}{unit}" if count else ""
    return text or "0s"


@dataclass(frozen=True, slots=True)
class _Key:
    """How one key is checked, and written back from the field of the same name."""

    convert: Callable[[Any], Any]
    dump: Callable[[Any], Any] | None = _same  # None: written by hand (the secret keys)
    required: str | None = None  # what to write there, said when it is missing


_DURATION_KEY = _Key(_duration, _dump_duration)
_DAEMON_KEYS = {
    "refresh_interval": _Key(_positive_duration, _dump_duration),
    "refresh_before": _DURATION_KEY,
    "refresh_spread": _DURATION_KEY,
    "max_concurrent_refreshes": _Key(_positive_int),
    "request_timeout": _Key(_positive_duration, _dump_duration),
    "min_validity": _DURATION_KEY,
    "socket": _Key(_socket_path, str),
    "state_dir": _Key(_absolute_path, str),
    "log_format": _Key(_one_of("auto", "json", "console")),
    "log_level": _Key(_one_of("debug", "info", "warning", "error")),
    "admin_group": _Key(_principal),
    "unhealthy_after": _Key(_positive_duration, _dump_duration),
    "notify_command": _Key(_argv, list),
    "notify_interval": _Key(_positive_duration, _dump_duration),
}
_PROVIDER_KEYS = {
    "preset": _Key(_one_of(*PRESETS)),
    "client_id": _Key(_text, required="the client (application) ID of the app registration"),
    "client_secret": _Key(_inline_secret, None),
    "client_secret_file": _Key(_secret_file, None),
    "client_secret_command": _Key(_argv, None),
    "scopes": _Key(_scopes, list),
    "tenant": _Key(_tenant),
    "cloud": _Key(_one_of(*_CLOUDS)),
    "issuer": _Key(_url),
    **{key: _Key(_url) for key in presets.ENDPOINT_KEYS},
    "token_auth_method": _Key(_one_of("client_secret_post", "client_secret_basic")),
    "authorize_params": _Key(_params, dict),
    "redirect_port": _Key(_port),
    "testing": _Key(_flag),
    "refresh_token_max_age": _Key(_positive_duration, _dump_duration),
    "refresh_token_max_idle": _Key(_positive_duration, _dump_duration),
    "default_expires_in": _Key(_positive_duration, _dump_duration),
}
_ACCOUNT_KEYS = {
    "provider": _Key(_text, lambda p: p.name, "the name of a [providers.NAME] table ({defined})"),
    "username": _Key(_text),
    "flow": _Key(_one_of(*FLOWS)),
    "scopes": _Key(_scopes, list),
    "refresh_before": _DURATION_KEY,
    "min_validity": _DURATION_KEY,
    "allow_users": _Key(_principals, list),
    "allow_groups": _Key(_principals, list),
    "imap_server": _Key(_server),
    "smtp_server": _Key(_server),
    "imap_security": _Key(_one_of(*MAIL_SECURITY)),
    "smtp_security": _Key(_one_of(*MAIL_SECURITY)),
    "tls_ca_file": _Key(_absolute_path, str),
    "token_file": _Key(_absolute_path, str),
    "token_file_owner": _Key(_principal),
    "token_file_group": _Key(_principal),
    "token_file_mode": _Key(_file_mode, lambda mode: f"{mode:04o}"),
    "notify_command": _Key(_argv, list),
    "notify_interval": _Key(_positive_duration, _dump_duration),
    "proxy_password_file": _Key(_secret_file, None),
    "proxy_password_command": _Key(_argv, None),
    "pop3_server": _Key(_server),
    "pop3_security": _Key(_one_of(*MAIL_SECURITY)),
    "socketmap_keys": _Key(_socketmap_keys, list),
}
_PROXY_KEYS = {
    "imap": _Key(_listener),
    "pop3": _Key(_listener),
    "smtp": _Key(_listener),
    "socketmap": _Key(_socket_path, str),
    "tls_certificate_file": _Key(_absolute_path, str),
    "tls_key_file": _Key(_absolute_path, str),
}
_STORE_KEYS = {
    "backend": _Key(_one_of("files", "etcd")),
    "encryption_key_file": _Key(_secret_file, str),
    "encryption_key_command": _Key(_argv, list),
}
# The fleet backend's keys (docs/fleet.md): named, so that they are refused for what they are.
_ETCD_KEYS = (
    "endpoints prefix ca_file cert_file key_file username password_file lease_ttl"
).split()
_TABLES = {
    "daemon": ("[daemon]", _DAEMON_KEYS),
    "proxy": ("[proxy]", _PROXY_KEYS),
    "store": ("[store]", _STORE_KEYS),
    "providers": ("a [providers.NAME] table", _PROVIDER_KEYS),
    "accounts": ("an [accounts.NAME] table", _ACCOUNT_KEYS),
}


class _Problems:
    """Problems and warnings, each prefixed with the file, the table and the key."""

    def __init__(self, source: str) -> None:
        self.source, self.lines, self.warnings = source, list[str](), list[str]()

    def add(self, table: str | None, key: str | None, problem: str, *, warn: bool = False) -> None:
        where = " ".join(part for part in (table and f"[{table}]", key) if part)
        (self.warnings if warn else self.lines).append(f"{self.source}: {where}: {problem}")


def _unknown_key(key: str, keys: Mapping[str, _Key], homes: Mapping[str, str]) -> str:
    name = _RENAMED.get(key, key)
    called = f"mailoauthd calls this '{name}'" if name != key else ""
    if called and name in keys:
        return f"unknown key; {called}"
    if places := [homes.get(t, home) for t, (home, known) in _TABLES.items() if name in known]:
        called += ", and " if called else ""
        return f"unknown key here; {called}it belongs in {' or '.join(places)}"
    if close := difflib.get_close_matches(key, keys, 1):
        return f"unknown key; did you mean '{close[0]}'?"
    if not keys:
        return "unknown key; settings go in [daemon], [providers.NAME] or [accounts.NAME]"
    return f"unknown key; expected one of: {', '.join(keys)}"


def _read(
    problems: _Problems,
    table: str,
    raw: Mapping[str, object],
    keys: Mapping[str, _Key],
    homes: Mapping[str, str] | None = None,
    defined: str = "",
) -> dict[str, Any]:
    """Convert a table's keys; record the unknown, invalid and missing ones."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            if key not in keys:
                raise _Invalid(_unknown_key(key, keys, homes or {}))
            values[key] = keys[key].convert(value)
        except _Invalid as exc:
            problems.add(table, key, str(exc))
    for key, spec in keys.items():
        if spec.required and key not in raw:
            expected = spec.required.format(defined=defined)
            problems.add(table, key, f"required key is missing; expected {expected}")
    return values


def _only(has: Callable[[presets.Preset], object]) -> str:
    """The presets with a feature, for "only the 'microsoft' preset has one"."""
    names = [f"'{p.name}'" for p in presets.PRESETS.values() if has(p)]
    return f"only the {' or '.join(names)} preset{'s' if len(names) > 1 else ''}"


def _build_provider(
    problems: _Problems, name: str, raw: Mapping[str, object], base_dir: Path
) -> Provider | None:
    table, before = f"providers.{name}", len(problems.lines)
    values = _read(problems, table, raw, _PROVIDER_KEYS)
    if "preset" in raw and "preset" not in values:
        return None  # every default depends on the preset
    preset = values.pop("preset", presets.GENERIC)
    facts = presets.PRESETS[preset]
    if len(given := [key for key in _SECRET_KEYS if key in raw]) > 1:
        problems.add(table, given[1], f"set only one of {', '.join(given)}")
    secret = None
    if "client_secret" in values:
        secret = SecretSource(inline=values.pop("client_secret"))
        instead = "prefer client_secret_file or client_secret_command"
        problems.add(table, "client_secret", f"is inline in the config file; {instead}", warn=True)
    elif path := values.pop("client_secret_file", ""):
        # A leading variable names its own directory, e.g. systemd's $CREDENTIALS_DIRECTORY.
        secret = SecretSource(file=Path(path) if path.startswith("$") else base_dir / path)
    elif "client_secret_command" in values:
        secret = SecretSource(command=values.pop("client_secret_command"))
    if facts.clouds:
        default_cloud = next(iter(facts.clouds))
        values = {"tenant": facts.default_tenant, "cloud": default_cloud, **values}
    for key in [key for key in ("tenant", "cloud") if key in raw and not facts.clouds]:
        only = _only(lambda p: p.clouds)
        problems.add(table, key, f"{only} has one; this one is '{preset}'")
    if values.get("testing") and facts.testing_max_age is None:
        only = _only(lambda p: p.testing_max_age)
        problems.add(table, "testing", f"{only} has it; this one is '{preset}'")
    elif values.get("testing"):
        values = {"refresh_token_max_age": facts.testing_max_age, **values}
    if "issuer" in raw and preset != presets.GENERIC:
        why = f"the '{preset}' preset knows its endpoints; override single ones instead"
        problems.add(table, "issuer", f"is for discovery with preset 'generic' only; {why}")
    if preset == presets.GENERIC and not {"token_endpoint", "issuer"} & set(raw):
        need = "a generic provider needs token_endpoint (and authorization_endpoint or"
        need += " device_authorization_endpoint to sign in), or issuer to discover them"
        problems.add(table, "token_endpoint", f"required key is missing; {need}")
    defaults = presets.defaults(facts, values.get("tenant"), values.get("cloud"))
    for key, problem in provider_checks.provider_problems(preset, secret is not None):
        problems.add(table, key, problem, warn=True)
    if len(problems.lines) > before:
        return None
    return Provider(name=name, preset=preset, client_secret=secret, **{**defaults, **values})


def _build_account(
    problems: _Problems,
    name: str,
    raw: Mapping[str, object],
    daemon: DaemonSettings,
    providers: Mapping[str, Provider | None],
    base_dir: Path = Path("/"),
) -> Account | None:
    table, before = f"accounts.{name}", len(problems.lines)
    ref = raw["provider"] if isinstance(raw.get("provider"), str) else ""
    there = f"[providers.{ref}]"
    homes = {"providers": there if ref in providers else "a [providers.NAME] table"}
    defined = f"defined: {', '.join(providers)}" if providers else "none is defined yet"
    values = _read(problems, table, raw, _ACCOUNT_KEYS, homes, defined)
    if "proxy_password_file" in raw and "proxy_password_command" in raw:
        both = "set only one of proxy_password_file and proxy_password_command"
        problems.add(table, "proxy_password_command", both)
    if path := values.pop("proxy_password_file", ""):
        # Read like client_secret_file: relative to the file, or from $CREDENTIALS_DIRECTORY.
        values["proxy_password"] = SecretSource(
            file=Path(path) if path.startswith("$") else base_dir / path
        )
    elif command := values.pop("proxy_password_command", None):
        values["proxy_password"] = SecretSource(command=command)
    if values.pop("provider", None) is not None and ref not in providers:
        close = difflib.get_close_matches(str(ref), providers, 1)
        maybe = f"did you mean '{close[0]}'? " if close else ""
        problems.add(table, "provider", f"there is no {there} table; {maybe}({defined})")
    flow = values.get("flow", "authorization_code")
    flow_ok = "flow" not in raw or "flow" in values
    if "username" not in raw and flow != "client_credentials" and flow_ok:
        expected = "the mailbox address, e.g. 'alice@example.com' (the SASL user and login hint)"
        problems.add(table, "username", f"required key is missing; expected {expected}")
    provider = providers.get(str(ref))
    facts = presets.PRESETS[provider.preset] if provider is not None else None
    if provider is not None and facts is not None and flow == "client_credentials":
        if facts.client_credentials_refused:
            problems.add(table, "flow", facts.client_credentials_refused)
        elif provider.client_secret is None:
            fix = "set client_secret_file or client_secret_command there"
            problems.add(
                table, "flow", f"client_credentials needs a client secret; {there} has none; {fix}"
            )
        elif (tenant := provider.tenant) in facts.shared_tenants and provider.token_endpoint == (
            presets.defaults(facts, tenant, provider.cloud).get("token_endpoint")
        ):
            fix = f"set tenant in {there} to your directory's domain or ID"
            problems.add(
                table, "flow", f"client_credentials needs a directory, not {tenant!r}; {fix}"
            )
    if len(problems.lines) > before or provider is None or facts is None:
        return None
    if "scopes" not in values:
        app_only = presets.app_only_scopes(facts, provider.cloud)
        use_app = flow == "client_credentials" and app_only is not None
        values["scopes"] = app_only if use_app else provider.scopes
    for key, problem in provider_checks.account_problems(provider.preset, flow, values["scopes"]):
        problems.add(table, key, problem)
    if len(problems.lines) > before:
        return None
    if (servers := presets.mail_servers(facts, provider.cloud)) is not None:
        imap, smtp, pop3 = servers.imap, servers.smtp, servers.pop3
        values = {"imap_server": imap, "smtp_server": smtp, "pop3_server": pop3, **values}
    for kind in ("imap", "smtp", "pop3"):
        host = str(values.get(f"{kind}_server", "")).rpartition(":")[0].strip("[]")
        if values.get(f"{kind}_security") == "none" and host not in _LOOPBACK_HOSTS:
            why = f"a token in the clear is allowed only to {', '.join(_LOOPBACK_HOSTS)}"
            problems.add(table, f"{kind}_security", f"is 'none' for {host or 'no server'}; {why}")
    values = {
        "refresh_before": daemon.refresh_before,
        "min_validity": daemon.min_validity,
        "notify_command": daemon.notify_command,
        "notify_interval": daemon.notify_interval,
        **values,
    }
    if values["min_validity"] >= values["refresh_before"]:
        why = "mail programs would wait for refreshes; make refresh_before longer"
        problems.add(table, "min_validity", f"is not shorter than refresh_before: {why}", warn=True)
    return Account(name=name, provider=provider, **{**values, "flow": flow})


def _build_proxy(problems: _Problems, raw: Mapping[str, object]) -> ProxySettings:
    values = _read(problems, "proxy", raw, _PROXY_KEYS)
    cert, key = values.get("tls_certificate_file"), values.get("tls_key_file")
    if (cert is None) != (key is None):
        missing = "tls_key_file" if key is None else "tls_certificate_file"
        problems.add(
            "proxy", missing, "required with the other of tls_certificate_file and tls_key_file"
        )
    for kind in ("imap", "pop3", "smtp"):
        if (where := values.get(kind)) and not is_loopback(where) and cert is None:
            why = "a listener others can reach must offer STARTTLS: set tls_certificate_file"
            problems.add(
                "proxy", kind, f"{where!r} is not a loopback address; {why} and tls_key_file"
            )
    return ProxySettings(**values)


def _build_store(problems: _Problems, raw: Mapping[str, object], base_dir: Path) -> StoreSettings:
    before = len(problems.lines)
    for key in [key for key in raw if key in _ETCD_KEYS]:
        problems.add("store", key, "is for backend 'etcd', which is not supported yet")
    raw = {key: value for key, value in raw.items() if key not in _ETCD_KEYS}
    values = _read(problems, "store", raw, _STORE_KEYS)
    if (
        len(
            given := [
                key for key in ("encryption_key_file", "encryption_key_command") if key in raw
            ]
        )
        > 1
    ):
        problems.add("store", given[1], f"set only one of {', '.join(given)}")
    if path := values.get("encryption_key_file"):
        # A leading variable names its own directory, e.g. systemd's $CREDENTIALS_DIRECTORY.
        values["encryption_key_file"] = Path(path) if path.startswith("$") else base_dir / path
    if values.get("backend") == "etcd":
        problems.add(
            "store",
            "backend",
            "'etcd' is not supported yet by this version (docs/fleet.md); use 'files'",
        )
    return StoreSettings(**values) if len(problems.lines) == before else StoreSettings()


def _table(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name)
    return value if isinstance(value, dict) else {}  # not a table: reported by parse()


def _entries(problems: _Problems, document: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The named tables under [providers] or [accounts] (None if not a table), names checked."""
    tables = _table(document, kind)
    for name, raw in tables.items():
        if not isinstance(raw, dict):
            # Show no value: a key misplaced here may well be the client secret.
            written = f"written [{kind}.{name}] {_got(raw, show=False)}"
            problems.add(kind, name, f"must be a table, {written}")
        elif not NAME_PATTERN.fullmatch(name):
            rule = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            problems.add(kind, repr(name), f"a name must be {rule}; it becomes a file name")
    return {name: raw if isinstance(raw, dict) else None for name, raw in tables.items()}


def parse(text: str, *, source: str, base_dir: Path | None = None) -> Config:
    """
    Check a configuration and turn it into a Config; pure, no file or process I/O.

    Args:
        text: the TOML document.
        source: names the file in messages; becomes Config.source.
        base_dir: for relative client_secret_file paths; by default the directory of `source`.

    Raises:
        ConfigError: every problem, one a line; also as its `problems` attribute.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _config_error([f"{source}: not valid TOML: {exc}"]) from None
    problems = _Problems(source)
    for name, value in document.items():
        if name in _TABLES and not isinstance(value, dict):
            problems.add(name, None, f"must be a table {_got(value, show=False)}")
        elif name not in _TABLES and not isinstance(value, dict):
            problems.add(None, name, _unknown_key(name, {}, {}))
        elif name not in _TABLES:
            close = difflib.get_close_matches(name, _TABLES, 1)
            hint = (
                f"did you mean '{close[0]}'?" if close else "expected one of: " + ", ".join(_TABLES)
            )
            problems.add(name, None, f"unknown table; {hint}")
    before = len(problems.lines)
    daemon_values = _read(problems, "daemon", _table(document, "daemon"), _DAEMON_KEYS)
    daemon = DaemonSettings(**daemon_values) if len(problems.lines) == before else DaemonSettings()
    base = Path(source).parent if base_dir is None else base_dir
    store = _build_store(problems, _table(document, "store"), base)
    providers = {
        name: None if raw is None else _build_provider(problems, name, raw, base)
        for name, raw in _entries(problems, document, "providers").items()
    }
    accounts = {
        name: None if raw is None else _build_account(problems, name, raw, daemon, providers, base)
        for name, raw in _entries(problems, document, "accounts").items()
    }
    proxy = _build_proxy(problems, _table(document, "proxy"))
    if problems.lines:
        raise _config_error(problems.lines)
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
        ConfigError: the file cannot be read, or `parse` found problems.
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
        raise _config_error([message], hint=hint if missing else None) from exc
    return parse(text, source=str(path), base_dir=path.absolute().parent)


def _dump(obj: object, keys: Mapping[str, _Key]) -> dict[str, Any]:
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
        providers[name] = _dump(provider, _PROVIDER_KEYS)
        if (secret := provider.client_secret) and secret.inline is not None:
            providers[name]["client_secret"] = secret.inline.reveal()
        elif secret:
            providers[name][secret.key] = str(secret.file or "") or list(secret.command or ())
    accounts = {name: _dump(a, _ACCOUNT_KEYS) for name, a in config.accounts.items()}
    for name, account in config.accounts.items():
        if (password := account.proxy_password) is not None and password.file is not None:
            accounts[name]["proxy_password_file"] = str(password.file)
        elif password is not None:
            accounts[name]["proxy_password_command"] = list(password.command or ())
    document = {
        "daemon": _dump(config.daemon, _DAEMON_KEYS),
        "proxy": _dump(config.proxy, _PROXY_KEYS),
        "store": _dump(config.store, _STORE_KEYS) if config.store != StoreSettings() else {},
        "providers": providers,
        "accounts": accounts,
    }
    return {key: table for key, table in document.items() if table}


def parse_duration(value: object, *, where: str) -> timedelta:
    """
    A duration: "90s", "3m", "1h", "2d", combinations such as "1h30m", or seconds ≥ 0.

    Args:
        value: a string, or a number that is not a bool.
        where: names the setting in the error message.

    Raises:
        ConfigError: naming `where` and saying what is accepted.
    """
    try:
        return _duration(value)
    except _Invalid as exc:
        raise _config_error([f"{where}: {exc}"]) from None


def _read_secret_file(path: Path, where: str, env: Mapping[str, str]) -> Secret:
    def expand(match: re.Match[str]) -> str:
        if (variable := match.group(1) or match.group(2)) in env:
            return env[variable]
        why = (
            "; systemd sets it for the service's LoadCredential= (to check the configuration "
            "outside the service: 'mailoauthd check-config --credentials-directory DIR')"
            if variable == "CREDENTIALS_DIRECTORY"
            else ""
        )
        raise _config_error([f"{where}: {path} needs ${variable}, which is not set{why}"])

    expanded = _VARIABLE.sub(expand, str(path))
    try:
        value = Path(expanded).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _config_error([f"{where}: cannot read {expanded}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError:
        # `from None`: the decoding error holds the file's bytes.
        raise _config_error([f"{where}: {expanded} is not UTF-8 text"]) from None
    if not value:
        raise _config_error([f"{where}: {expanded} is empty"])
    return Secret(value)


def _run_secret_command(argv: tuple[str, ...], where: str) -> Secret:
    program = f"{where}: {argv[0]!r}"
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SECRET_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except OSError as exc:
        raise _config_error([f"{program} cannot be run: {exc.strerror or exc}"]) from exc
    except subprocess.TimeoutExpired:
        # `from None` here and below: these exceptions carry what the command printed.
        seconds = SECRET_COMMAND_TIMEOUT_SECONDS
        raise _config_error([f"{program} did not finish within {seconds} seconds"]) from None
    if done.returncode:
        code = done.returncode
        status = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
        raise _config_error([f"{program} {status}; run it yourself to see why"])
    try:
        value = done.stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _config_error([f"{program} printed something that is not UTF-8 text"]) from None
    if not value:
        raise _config_error([f"{program} printed nothing on stdout"])
    return Secret(value)
