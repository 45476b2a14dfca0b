"""
"host:port" written once: read, written back, and which hosts are this machine.

A mail server, a proxy listener and the login test of `mailoauth test` each name a
place as "host:port", an IPv6 address in brackets ("[::1]:993", as in a URI: RFC 3986
§3.2.2). The configuration checks such text with `parse` and keeps it as written;
whoever connects or listens parses it again here, so that all read it alike.

Standard library only, and imports nothing of ours: the helper reads it too
(tests/test_client.py).
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

# This machine as a URI or a configuration names it: the loopback redirect of a
# sign-in, a development provider's http address, a mail server reached in the clear.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# TCP ports are 16 bits; port 0 asks the kernel for any free port, so it names no
# server to connect to and no listener anyone could be told of.
MIN_PORT = 1
MAX_PORT = 65535
# Characters no host name or IPv4 address has, which a URL or a typo would bring in.
_NOT_IN_HOSTS = frozenset("/[]@?#%\\")


class Invalid(ValueError):
    """Not a "host:port"; the message says what is wrong, for a person."""


class BadPort(Invalid):
    """A "host:port" whose port is not a number from MIN_PORT to MAX_PORT."""


class HostPort(NamedTuple):
    """A parsed "host:port": the host without brackets, the port a number."""

    host: str
    port: int

    def __str__(self) -> str:
        return join(self.host, self.port)


def parse(text: str) -> HostPort:
    """
    The host and port of "host:port", "[IPv6]:port" for an IPv6 address.

    Raises:
        BadPort: the port is missing, not decimal digits, or outside 1..65535.
        Invalid: no host; an IPv6 address without brackets (where would its port
            start?); brackets around anything but an IPv6 address; white space,
            control characters or URL punctuation in the host.
    """
    host, colon, number = text.rpartition(":")
    if not colon or not host:
        raise Invalid("there is no 'host:' before the port")
    if not (number.isascii() and number.isdigit() and len(number) <= 5):
        raise BadPort(f"the port is not a number from {MIN_PORT} to {MAX_PORT}")
    port = int(number)
    if not MIN_PORT <= port <= MAX_PORT:
        raise BadPort(f"the port is not a number from {MIN_PORT} to {MAX_PORT}")
    if host.startswith("["):
        return HostPort(_bracketed(host), port)
    if ":" in host:
        raise Invalid("an IPv6 address goes in brackets, e.g. '[::1]:993'")
    if not host.isprintable() or any(c.isspace() or c in _NOT_IN_HOSTS for c in host):
        raise Invalid("the host has characters no host name has")
    return HostPort(host, port)


def _bracketed(host: str) -> str:
    """The IPv6 address in "[...]", zone ("%eth0") and all."""
    address = host[1:-1] if host.endswith("]") else ""
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise Invalid("only an IPv6 address goes in brackets, e.g. '[::1]:993'") from None
    return address


def join(host: str, port: int) -> str:
    """ "host:port" for a host and a port, an IPv6 address in brackets: what `parse` reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether a host (no brackets) is this machine: localhost, or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "LOOPBACK_HOSTS",
    "MAX_PORT",
    "MIN_PORT",
    "BadPort",
    "HostPort",
    "Invalid",
    "is_loopback",
    "join",
    "parse",
]
