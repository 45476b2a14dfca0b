"""
What a provider sends, checked at the boundary before anything else sees it.

A provider's answer is untrusted input: its body is read only up to MAX_BODY,
parsed without letting deep nesting, huge numbers or non-finite floats escape
as exceptions, and every piece of it that we keep is checked here. Text meant
for people (error descriptions, codes) loses its control characters and is
bounded in length before it is stored, logged, shown, or handed to a child
process; tokens must be RFC 6750 `b64token`s, or they are refused unseen.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import unicodedata
from urllib.parse import urlsplit

from mailoauthd import hostport

# An OAuth answer is a few KiB; a provider that sends more is broken or hostile.
MAX_BODY = 1 << 20
# Longest text of a provider's we keep (an error description, a code) ...
MAX_TEXT = 300
# ... and the longest of ours that embeds one (last_error, messages in status).
MAX_MESSAGE = 1000
# Longest token we accept: Microsoft's JWT access tokens run to a few KiB.
MAX_TOKEN = 16384
# Numbers we read as seconds (expires_in, interval) beyond this are nonsense.
MAX_SECONDS = 10 * 366 * 24 * 3600

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def clean_text(value: object, limit: int = MAX_TEXT) -> str:
    """
    A provider's text made safe to store, log, show and pass on: one line, no
    control characters (NUL, escapes, bidi overrides), at most `limit` characters.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * limit:
        text = text[: 4 * limit]  # never walk a huge string character by character
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    )
    kept = " ".join(kept.split())
    if len(kept) <= limit:
        return kept
    return kept[: limit - 1] + "…" if limit > 0 else ""


def shown_uri(value: object) -> str | None:
    """
    A provider's address fit to show a person: https, or http to a loopback host (a
    development provider); printable ASCII only, so no look-alike letters. None otherwise.
    """
    if not isinstance(value, str) or not 0 < len(value) <= 2048:
        return None
    if not all("!" <= c <= "~" for c in value):
        return None  # control characters, spaces, and look-alike letters
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme == "https" and host:
        return value
    if parts.scheme == "http" and host in hostport.LOOPBACK_HOSTS:
        return value
    return None


def short_repr(value: object, limit: int = 40) -> str:
    """A bounded, printable repr of a value we refuse, for a message."""
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        try:
            text = repr(value)
        except ValueError:  # an int too long to print (sys.set_int_max_str_digits)
            text = f"an integer of about {value.bit_length() * 0.30103:.0f} digits"  # type: ignore[union-attr]
    else:
        text = f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return clean_text(text, limit)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> object:
    """
    A JSON document, or None when the bytes are not one we can use.

    Never raises: deep nesting (RecursionError), NaN/Infinity, integers too long
    to convert, undecodable bytes are all "not JSON". Floats that overflow come
    back as inf and are refused wherever a number is read (`seconds`).
    """
    try:
        text = raw.decode("utf-8-sig")  # RFC 8259: UTF-8; a BOM may be ignored
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError, MemoryError):
        return None


def json_object(raw: bytes) -> dict[str, object] | None:
    """The body as a JSON object, or None."""
    body = parse_json(raw)
    return body if isinstance(body, dict) else None


def seconds(value: object, *, maximum: float = MAX_SECONDS) -> float | None:
    """
    A provider's count of seconds (a number or a string of digits), or None when it
    is not one: negative, non-finite, a bool, absurdly large, another type.
    """
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 12):
            return None
        value = int(value)  # some providers send numbers as strings
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and value.bit_length() > 64:
        return None
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= maximum:
        return None
    return number


def is_b64token(value: object) -> bool:
    """True for a string RFC 6750 allows as a bearer token, of sane length."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TOKEN
        and _B64TOKEN.fullmatch(value) is not None
    )


def jwt_claims(token: str) -> dict[str, object] | None:
    """
    The claims of a JWS compact JWT (an ID token, a JWT access token), unverified;
    None when it is not one. Only what came straight from an endpoint over TLS is read.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (ValueError, binascii.Error):
        return None
    return json_object(raw)


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (seconds since the epoch) of a JWT access token, or None."""
    claims = jwt_claims(token)
    return None if claims is None else seconds(claims.get("exp"), maximum=1e11)
