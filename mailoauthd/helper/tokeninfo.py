"""
What an access token says about itself, and what a mail server's refusal means.

`mailoauth inspect ACCOUNT` prints the claims of a JWT access token (Microsoft's for work
and school accounts are JWTs; Google's and personal Microsoft accounts' are opaque)
without the token: who it is for (`aud`), what it allows
(`scp`, `scope`, `roles`), whose it is (`upn`, `email`, ...), the tenant (`tid`) and
when it expires. `mailoauth test` asks `advice()` what to change when a server refuses
a login. Nothing here verifies a signature: the claims are read to explain, never to
decide. Standard library only: it runs in the helper.
"""

from __future__ import annotations

import binascii
import json
import sys
import time
from typing import Any

from mailoauthd import errors, protocol
from mailoauthd.helper import transport

# Exchange Online's audiences: the resource a mail token must be issued for.
EXCHANGE_AUDIENCES = (
    "https://outlook.office.com",
    "https://outlook.office365.com",
    "https://outlook.office365.us",
    "https://partner.outlook.cn",
    "00000002-0000-0ff1-ce00-000000000000",  # Exchange Online's application ID
)
# What each protocol needs in a delegated Microsoft token.
MICROSOFT_SCOPES = {
    "IMAP": "IMAP.AccessAsUser.All",
    "SMTP": "SMTP.Send",
    "POP": "POP.AccessAsUser.All",
}
_SHOWN = (
    ("aud", "audience"),
    ("scp", "scopes"),
    ("scope", "scopes"),
    ("roles", "app roles"),
    ("upn", "user"),
    ("unique_name", "user"),
    ("preferred_username", "user"),
    ("email", "email"),
    ("tid", "tenant"),
    ("appid", "client"),
    ("azp", "client"),
    ("iss", "issuer"),
)


def claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload, or None for an opaque token (anything that does not decode)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        decoded = json.loads(binascii.a2b_base64(payload.replace("-", "+").replace("_", "/")))
    except (binascii.Error, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def describe(found: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """(label, value) lines for the claims people need; never the token itself."""
    lines: list[tuple[str, str]] = []
    for key, label in _SHOWN:
        if key in found:
            value = found[key]
            text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append((f"{label} ({key})", text))
    exp = found.get("exp")
    if isinstance(exp, int | float):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
        left = exp - now
        lines.append(
            ("expires (exp)", f"{when}, " + (f"in {left:.0f} s" if left > 0 else "expired"))
        )
    return lines


def _scopes(found: dict[str, Any]) -> set[str]:
    raw = found.get("scp", found.get("scope", ""))
    words = raw if isinstance(raw, list) else str(raw).split()
    roles = found.get("roles", [])
    words += roles if isinstance(roles, list) else []
    # Full URIs ("https://outlook.office.com/IMAP.AccessAsUser.All") count by their last part.
    return {str(w).rsplit("/", 1)[-1] for w in words}


def advice(protocol_name: str, answer: str, token: str, user: str) -> str | None:
    """
    What to change, when a server refused a login with this token; None if unrecognised.

    Args:
        protocol_name: "IMAP" or "SMTP".
        answer: what the server said.
        token: the access token sent (read for its claims, never shown).
        user: the SASL user sent.
    """
    if "5.7.139" in answer or "SmtpClientAuthentication" in answer:
        return (
            "SMTP AUTH is disabled for this mailbox or the whole tenant: an Exchange "
            f"administrator runs 'Set-CASMailbox -Identity {user} "
            "-SmtpClientAuthenticationDisabled $false'; see docs/providers.md"
        )
    if "5.7.9" in answer:
        return (
            "Google refused this login for the account: check that the token carries the "
            "scope https://mail.google.com/, that username is the Google account that signed "
            "in, and, for Google Workspace, that the administrator allows the app under "
            "Security, API controls"
        )
    if "5.7.8" in answer and "Username and Password not accepted" in answer:
        return (
            "Google did not accept the token for this user: username must be the account "
            "that signed in, with the scope https://mail.google.com/"
        )
    found = claims(token)
    if found is None:
        return None
    aud = found.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if not any(str(a).rstrip("/") in EXCHANGE_AUDIENCES for a in audiences):
        return (
            f"the token is for {aud!r}, not for Exchange Online: the provider's scopes must "
            "name the mail resource, as the microsoft preset's default scopes do, e.g. "
            "https://outlook.office.com/IMAP.AccessAsUser.All"
        )
    needed = MICROSOFT_SCOPES.get(protocol_name)
    granted = _scopes(found)
    app_only = "roles" in found and "scp" not in found
    if needed and not app_only and needed not in granted:
        return (
            f"the token does not allow {protocol_name}: it lacks {needed}, having "
            f"{' '.join(sorted(granted)) or 'no scopes'}; add the permission to the app "
            "registration and to scopes, then sign in again"
        )
    holder = found.get("upn") or found.get("preferred_username") or found.get("unique_name")
    if isinstance(holder, str) and user and holder.lower() != user.lower():
        return (
            f"the token is {holder}'s but username is {user}: use the mailbox of the person "
            "who signed in, or have them granted access to this mailbox"
        )
    if protocol_name == "IMAP":
        return (
            f"the token looks right: IMAP may be disabled for this mailbox, which an Exchange "
            f"administrator enables with 'Set-CASMailbox -Identity {user} -ImapEnabled $true', "
            "or the mailbox has no Exchange Online licence"
        )
    return None


def main(account: str, *, socket_path: str | None, out: Any = None) -> int:
    """`mailoauth inspect ACCOUNT`: the current access token's claims, not the token."""
    out = out or sys.stdout
    reply = transport.request_reply(
        protocol.encode_token_request(
            account, min_validity=-1.0, timeout=transport.DEFAULT_TIMEOUT
        ),
        socket_path,
        transport.DEFAULT_TIMEOUT + transport.ANSWER_GRACE,
    )
    token = reply.get("token")
    if not isinstance(token, str) or not token:
        raise errors.MailoauthdError(f"{account}: the daemon sent no token")
    found = claims(token)
    out.write(f"{account}: access token of {len(token)} characters\n")
    if found is None:
        out.write(
            "  opaque token: it carries no claims to read (Google's and many others' are "
            "opaque; only the provider knows what it allows)\n"
        )
        return 0
    lines = describe(found, time.time())
    width = max((len(label) for label, _ in lines), default=0)
    for label, value in lines:
        out.write(f"  {label.ljust(width)}  {value}\n")
    return 0
