"""
"host:port" (mailoauthd/hostport.py): what the configuration, the proxy and the helper's
login test all read. Round trips over hosts of every kind, the edges of the port range,
IPv6 brackets, and junk, which must come out as hostport.Invalid and nothing else.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailoauthd import hostport
from mailoauthd.hostport import BadPort, HostPort, Invalid

PORTS = st.integers(min_value=hostport.MIN_PORT, max_value=hostport.MAX_PORT)
NAMES = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}\Z")
HOSTS = st.one_of(
    NAMES,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@given(HOSTS, PORTS)
def test_what_join_writes_parse_reads(host: str, port: int) -> None:
    """Any host and port, written as "host:port" (IPv6 in brackets), read back unchanged."""
    text = hostport.join(host, port)
    assert hostport.parse(text) == HostPort(host, port)
    assert str(hostport.parse(text)) == text


@given(st.text(max_size=40))
def test_junk_is_invalid_or_a_sane_host_port(text: str) -> None:
    """Whatever the text, the answer is Invalid or a host and port that join writes back."""
    try:
        found = hostport.parse(text)
    except Invalid:
        return
    assert hostport.MIN_PORT <= found.port <= hostport.MAX_PORT
    assert found.host
    assert not any(c.isspace() or c in "/[]" for c in found.host)
    assert hostport.parse(str(found)) == found


@given(st.text(alphabet=":[]0123456789abcdef.", max_size=20))
def test_colons_and_brackets(text: str) -> None:
    """Text made of what IPv6 addresses are made of: a host with a colon is an IPv6 address."""
    try:
        found = hostport.parse(text)
    except Invalid:
        return
    if ":" in found.host:
        ipaddress.IPv6Address(found.host)
        assert text.startswith("[")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("outlook.office365.com:993", HostPort("outlook.office365.com", 993)),
        ("127.0.0.1:1", HostPort("127.0.0.1", 1)),
        ("localhost:65535", HostPort("localhost", 65535)),
        ("[::1]:1143", HostPort("::1", 1143)),
        ("[fe80::1%eth0]:993", HostPort("fe80::1%eth0", 993)),
        ("host:00993", HostPort("host", 993)),
    ],
)
def test_examples(text: str, expected: HostPort) -> None:
    assert hostport.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "host:0",
        "host:65536",
        "host:99999",
        "host:",
        "host:-1",
        "host:+1",
        "host: 1",
        "host:１",
        "host:1e3",
    ],
)
def test_ports_outside_1_to_65535(text: str) -> None:
    """0 names no server; 65536 does not fit in 16 bits; only ASCII digits are a port."""
    with pytest.raises(BadPort):
        hostport.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "993",
        ":993",
        "::1:993",  # where does the address end?
        "fe80::1:993",
        "[]:993",
        "[::1:993",
        "::1]:993",
        "[example.com]:993",  # brackets are for IPv6 addresses
        "[127.0.0.1]:993",
        "[::1]x:993",
        "mail example.com:993",
        "mail.example.com/imap:993",
        "user@mail.example.com:993",
        "mail.example.com\x00:993",
        "mail.example.com\u202e:993",
    ],
)
def test_not_host_port(text: str) -> None:
    with pytest.raises(Invalid):
        hostport.parse(text)


def test_loopback() -> None:
    """localhost and every loopback address are this machine; the wildcard is not."""
    for host in (*hostport.LOOPBACK_HOSTS, "127.0.0.2"):
        assert hostport.is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com", ""):  # noqa: S104
        assert not hostport.is_loopback(host), host
