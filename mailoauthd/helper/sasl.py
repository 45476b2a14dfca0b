"""
SASL initial client responses for XOAUTH2 and OAUTHBEARER: the one place they are spelled.

`mailoauth sasl` prints one base64-encoded; `mailoauth test` sends one to a server.
"""

from __future__ import annotations

from mailoauthd import errors

MECHANISMS = ("xoauth2", "oauthbearer")


def initial_response(
    user: str,
    token: str,
    *,
    mechanism: str,
    host: str | None = None,
    port: str | int | None = None,
) -> str:
    """
    The raw (not yet base64) SASL initial client response.

    Args:
        user: the SASL user (the account's username).
        token: the access token.
        mechanism: "xoauth2" (Google/Microsoft's) or "oauthbearer" (RFC 7628).
        host: for OAUTHBEARER, the server's host name, if known.
        port: for OAUTHBEARER, the server's port, if known.

    Raises:
        UsageError: another mechanism.
    """
    mechanism = mechanism.lower()
    if mechanism == "xoauth2":
        return f"user={user}\x01auth=Bearer {token}\x01\x01"
    if mechanism != "oauthbearer":
        raise errors.UsageError(f"--mechanism must be xoauth2 or oauthbearer (got {mechanism!r})")
    # RFC 5801 GS2 header: ',' and '=' in the authzid are escaped.
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    fields = f"n,a={authzid},\x01"
    if host:
        fields += f"host={host}\x01"
    if port:
        fields += f"port={port}\x01"
    return f"{fields}auth=Bearer {token}\x01\x01"


def encode(raw: str) -> str:
    """A raw response as SASL sends it: base64, one line, no newline."""
    import binascii  # built into the interpreter; only `sasl` and `test` need it

    return binascii.b2a_base64(raw.encode("utf-8"), newline=False).decode("ascii")


def sasl_response(
    user: str, token: str, *, mechanism: str, host: str | None = None, port: str | None = None
) -> str:
    """
    The base64 SASL initial client response (see initial_response for the arguments).

    Raises:
        UsageError: another mechanism.
    """
    return encode(initial_response(user, token, mechanism=mechanism, host=host, port=port))
