"""
The converters of configuration values: each checks one kind of value and says what is
wrong in words that follow "[table] key: ". Pure functions; no file or process I/O.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from mailoauthd import hostport, presets
from mailoauthd.config.problems import Invalid, got, shown
from mailoauthd.flows import Flow
from mailoauthd.secret import Secret

# Names become file names in the state directory and words in mail programs' commands.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PRESETS = tuple(presets.PRESETS)
FLOWS = tuple(flow.value for flow in Flow)
# How `mailoauth test` reaches a mail server: implicit TLS, STARTTLS, or in the clear
# ("none", allowed to loopback addresses only: a test server on this machine).
MAIL_SECURITY = ("tls", "starttls", "none")
# sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Every preset's clouds (Microsoft's today), and the tenants that name no single directory.
CLOUDS = tuple(dict.fromkeys(name for p in presets.PRESETS.values() for name in p.clouds))
_SHARED_TENANTS = tuple(t for p in presets.PRESETS.values() for t in p.shared_tenants)
_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_DOMAIN = re.compile(r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}")
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HELP = 'a duration such as "90s", "3m", "1h30m" or "2d", or a number of seconds'
# mailoauthd sets these for every sign-in; overriding them would break the flow or
# its defences against forged redirects.
_RESERVED_PARAMS = (
    "response_type client_id redirect_uri scope state code_challenge code_challenge_method nonce"
).split()


def text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string {got(value)}")
    return value


def one_of(*allowed: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if isinstance(value, str) and value in allowed:
            return value
        close = difflib.get_close_matches(value, allowed, 1) if isinstance(value, str) else []
        also = f"; did you mean '{close[0]}'?" if close else ""
        raise Invalid(f"must be one of {', '.join(map(repr, allowed))} {got(value)}{also}")

    return convert


def duration(value: object) -> timedelta:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value) and value >= 0:
                return timedelta(seconds=value)
        elif isinstance(value, str) and (match := _DURATION.fullmatch("".join(value.split()))):
            if any(match.groups()):
                days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
                return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (OverflowError, ValueError):
        raise Invalid(f"is too long a duration {got(value)}") from None
    unit = "; add a unit, e.g. '90s'" if isinstance(value, str) and value.isdigit() else ""
    raise Invalid(f"must be {_DURATION_HELP} {got(value)}{unit}")


def positive_duration(value: object) -> timedelta:
    if not (span := duration(value)):
        raise Invalid(f"must be longer than zero {got(value)}")
    return span


def port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise Invalid(f"must be a TCP port number from 1 to 65535 {got(value)}")


def flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"must be true or false {got(value)}")


def positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise Invalid(f"must be a whole number of at least 1 {got(value)}")


def absolute_path(value: object) -> Path:
    if "\0" in text(value) or not Path(str(value)).is_absolute():
        why = "a relative one would depend on where the daemon starts"
        raise Invalid(f"must be an absolute path {got(value)}; {why}")
    return Path(str(value))


def socket_path(value: object) -> Path:
    if (size := len(os.fsencode(path := absolute_path(value)))) > MAX_SOCKET_PATH_BYTES:
        raise Invalid(f"is {size} bytes long; socket paths may have {MAX_SOCKET_PATH_BYTES}")
    return path


def url(value: object) -> str:
    parts = urlsplit(text(value))
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number
        port_ok = False
    if parts.scheme not in ("https", "http") or not parts.hostname or not port_ok:
        raise Invalid(f"must be an https:// URL {got(value)}")
    if parts.fragment or any(character.isspace() for character in str(value)):
        raise Invalid(f"must be a URL without spaces or a #fragment {got(value)}")
    if parts.scheme == "http" and parts.hostname not in hostport.LOOPBACK_HOSTS:
        why = "plain http is allowed only to 127.0.0.1, [::1] or localhost"
        raise Invalid(f"must use https {got(value)}; {why}")
    return str(value)


def scopes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list of strings {got(value)}")
    for number, scope in enumerate(value, start=1):
        if not isinstance(scope, str) or not scope:
            raise Invalid(f"must be a list of strings (item {number} is {shown(scope)})")
        if any(character.isspace() for character in scope):
            raise Invalid(f"{scope!r} contains whitespace; list each scope as its own string")
        if value.index(scope) < number - 1:
            raise Invalid(f"{scope!r} is listed twice")
    return tuple(value)


def tenant(value: object) -> str:
    tenant = text(value)
    if tenant in _SHARED_TENANTS or _GUID.fullmatch(tenant) or _DOMAIN.fullmatch(tenant):
        return tenant
    expected = "'common', 'organizations', 'consumers', a directory ID (GUID) or a domain"
    raise Invalid(f"must be {expected} such as 'contoso.onmicrosoft.com' {got(value)}")


def params(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f"must be a table of strings {got(value)}")
    for name, param in value.items():
        if name in _RESERVED_PARAMS:
            why = "from client_id, scopes and the flow"
            raise Invalid(f"'{name}' is set by mailoauthd itself ({why}); remove it")
        if not name or not isinstance(param, str) or not param.strip():
            raise Invalid(f"must map names to non-empty strings ({name!r} is {got(param)})")
    return MappingProxyType(dict(value))


# The three secret keys never echo a value, not even a mistyped one.
def inline_secret(value: object) -> Secret:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string {got(value, show=False)}")
    return Secret(value)


def secret_file(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise Invalid(f"must be a non-empty path {got(value, show=False)}")
    if value.startswith("~"):
        raise Invalid("'~' is not expanded; write $HOME/..., or a path relative to this file")
    return value


def argv(value: object) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and value[0] and isinstance(value[0], str)) or any(
        not isinstance(word, str) or "\0" in word for word in value
    ):
        shell = ", not a shell command" if isinstance(value, str) else ""
        example = "['pass', 'show', 'mail/client-secret']"
        raise Invalid(f"must be a list of strings{shell}: program and arguments, e.g. {example}")
    return tuple(value)


# ids are 32-bit; (uid_t)-1 means "no change" to chown and setreuid, never a user.
_MAX_ID = 2**32 - 2


def principal(value: object) -> str | int:
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
    raise Invalid(f"must be a user or group name, or a numeric id {got(value)}")


def principals(value: object) -> tuple[str | int, ...]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list of names or numeric ids, e.g. ['alice', 1001] {got(value)}")
    found: list[str | int] = []
    for number, item in enumerate(value, start=1):
        try:
            one = principal(item)
        except Invalid as exc:
            raise Invalid(f"item {number} {exc}") from None
        if one in found:
            raise Invalid(f"{item!r} is listed twice")
        found.append(one)
    return tuple(found)


def server(value: object) -> str:
    """A mail server as "host:port" ("[::1]:993" for an IPv6 address), kept as written."""
    try:
        hostport.parse(text(value))
    except hostport.BadPort:
        span = f"{hostport.MIN_PORT} to {hostport.MAX_PORT}"
        raise Invalid(f"has no valid port number ({span}) {got(value)}") from None
    except hostport.Invalid as exc:
        example = "e.g. 'outlook.office365.com:993'"
        raise Invalid(f"must be 'host:port', {example}: {exc} {got(value)}") from None
    return str(value)


def file_mode(value: object) -> int:
    """Permission bits: 0o640 in TOML, or a string of octal digits such as "0640"."""
    mode = value
    if isinstance(value, str) and value and len(value) <= 4 and set(value) <= set("01234567"):
        mode = int(value, 8)
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777:
        if mode & 0o200 and not mode & 0o400:
            raise Invalid(f"lets the owner write but not read {got(value)}")
        if mode & 0o022:
            raise Invalid(f"lets others than the owner write {got(value)}; use e.g. '0640'")
        return mode
    raise Invalid(f"must be permission bits such as '0600' or '0640' (or 0o640) {got(value)}")


def listener(value: object) -> str:
    """A proxy listener: "host:port" with an IP address or localhost, "[::1]:1143" for IPv6."""
    text = server(value)
    host = hostport.parse(text).host
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise Invalid(f"must name an IP address to listen on {got(value)}") from None
    return text


def socketmap_keys(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(key, str) and key and not any(c.isspace() for c in key) for key in value
    ):
        example = "['[smtp.office365.com]:587', 'smtp.office365.com']"
        raise Invalid(f"must be a list of strings without spaces, e.g. {example} {got(value)}")
    return tuple(value)


def same(value: Any) -> Any:
    return value


def dump_duration(value: timedelta) -> str | float:
    if value.microseconds:
        return value / timedelta(seconds=1)
    seconds, text = value.days * 86400 + value.seconds, ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        text += f"{count}{unit}" if count else ""
    return text or "0s"
