"""
`mailoauth test ACCOUNT`: log in to the account's IMAP and SMTP servers with its token.

Like a provider console's "Test connection": it asks the daemon for the
account's servers and a token, then authenticates with XOAUTH2 or OAUTHBEARER
over IMAP and SMTP submission and logs out, printing each step and what the
server answered. It never prints the token. Standard library only (imaplib,
smtplib, ssl): it runs in the helper process.

A long SASL initial response is sent after the server's empty `334` prompt
rather than on the `AUTH` line: some servers (Dovecot's submission service)
refuse `AUTH` lines over about a kilobyte, and Microsoft's tokens are 1.5 to
2.5 KB long. IMAP's AUTHENTICATE always waits for the prompt.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from mailoauthd import errors, hostport, protocol
from mailoauthd.helper import sasl, tokeninfo, transport

# RFC 5321's limit for a command line before any extension raises it: an AUTH
# line up to this long is accepted by every server.
MAX_INITIAL_RESPONSE_LINE = 512
# Ports whose protocol starts with TLS rather than upgrading with STARTTLS.
IMPLICIT_TLS_PORTS = (993, 465)
REJECTED_HINT = (
    "check that the token's scopes allow {protocol} for this mailbox, that {protocol} "
    "with OAuth is enabled for it, and that username is the mailbox the token was issued to"
)


@dataclass(frozen=True)
class Server:
    """One mail server as configured for an account."""

    protocol: str  # "IMAP" or "SMTP"
    host: str
    port: int
    security: str  # "tls", "starttls" or "none"

    @property
    def label(self) -> str:
        return f"{self.protocol} {hostport.join(self.host, self.port)} ({self.security.upper()})"


class LoginFailed(Exception):
    """A step failed: `answer` is what the server said, if it said anything."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def parse_server(protocol_name: str, value: object, security: object) -> Server | None:
    """
    The server of an account's `imap_server`/`smtp_server` setting, or None if unset.

    Args:
        protocol_name: "IMAP" or "SMTP".
        value: "host:port" ("[::1]:993" for IPv6), as the config checked it.
        security: "tls", "starttls", "none", or None to go by the port.
    """
    if not isinstance(value, str) or not value:
        return None
    host, port = hostport.parse(value)
    if not isinstance(security, str):
        security = "tls" if port in IMPLICIT_TLS_PORTS else "starttls"
    return Server(protocol_name, host, port, security)


def initial_response(user: str, token: str, mechanism: str, server: Server) -> str:
    """The raw (not yet base64) SASL initial client response for `server` (sasl.py spells it)."""
    return sasl.initial_response(
        user, token, mechanism=mechanism, host=server.host, port=server.port
    )


def _challenge_text(challenge: bytes) -> str:
    text = challenge.decode("utf-8", "replace").strip()
    return text or "(empty)"


class _Conversation:
    """Answers the server's SASL prompts: the initial response, then an abort after an error."""

    def __init__(self, raw: str, mechanism: str, say: Callable[[str], None]) -> None:
        self.raw, self.mechanism, self.say = raw, mechanism, say
        self.sent = False

    def __call__(self, challenge: bytes | None = None) -> str:
        if not self.sent:
            self.sent = True
            return self.raw
        # The server refused and explains why; RFC 7628 §3.2.3: answer with ^A
        # (OAUTHBEARER) or an empty line (XOAUTH2) to get its final NO.
        self.say(f"server says why: {_challenge_text(challenge or b'')}")
        return "\x01" if self.mechanism == "oauthbearer" else ""


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def check_imap(
    server: Server,
    user: str,
    token: str,
    *,
    mechanism: str,
    ca_file: str | None,
    timeout: float,
    say: Callable[[str], None],
) -> None:
    """
    Connect, authenticate and log out; each step and answer goes to `say`.

    Raises:
        LoginFailed: a step failed; the message says which and what the server answered.
    """
    context = _tls_context(ca_file)
    try:
        if server.security == "tls":
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                server.host, server.port, ssl_context=context, timeout=timeout
            )
        else:
            imap = imaplib.IMAP4(server.host, server.port, timeout=timeout)
        say(f"connected: {imap.welcome.decode('utf-8', 'replace')}")
        if server.security == "starttls":
            started = imap.starttls(ssl_context=context)
            say(f"STARTTLS: {started[0]} {_words(started[1])}")
    except (OSError, imaplib.IMAP4.error) as exc:
        raise LoginFailed(f"{server.label}: cannot connect: {_why(exc)}") from None
    try:
        name = mechanism.upper()
        if f"AUTH={name}" not in imap.capabilities:
            offered = " ".join(c for c in imap.capabilities if c.startswith("AUTH=")) or "none"
            raise LoginFailed(
                f"{server.label} does not offer {name} (it offers {offered})",
                "try the other --mechanism",
            )
        say(f"AUTHENTICATE {name} as {user}")
        conversation = _Conversation(
            initial_response(user, token, mechanism, server), mechanism, say
        )
        try:
            answer = imap.authenticate(name, lambda c: conversation(c).encode())
        except imaplib.IMAP4.error as exc:
            refusal = _imap_error(exc)
            say(f"rejected: {refusal}")
            raise LoginFailed(
                f"{server.label}: the server rejected the token: {refusal}",
                tokeninfo.advice("IMAP", refusal, token, user)
                or REJECTED_HINT.format(protocol="IMAP"),
            ) from None
        say(f"authenticated: {answer[0]} {_words(answer[1])}")
        bye = imap.logout()
        say(f"LOGOUT: {bye[0]} {_words(bye[1])}")
    except (OSError, imaplib.IMAP4.abort) as exc:
        raise LoginFailed(f"{server.label}: connection lost: {_why(exc)}") from None
    finally:
        _close(imap)


def check_smtp(
    server: Server,
    user: str,
    token: str,
    *,
    mechanism: str,
    ca_file: str | None,
    timeout: float,
    say: Callable[[str], None],
) -> None:
    """
    Connect, authenticate and quit; each step and answer goes to `say`.

    Raises:
        LoginFailed: a step failed; the message says which and what the server answered.
    """
    context = _tls_context(ca_file)
    smtp = (
        smtplib.SMTP_SSL(context=context, timeout=timeout)
        if server.security == "tls"
        else smtplib.SMTP(timeout=timeout)
    )
    # connect() does not record the name that TLS checks the certificate against.
    smtp._host = server.host  # type: ignore[attr-defined]
    try:
        code, message = smtp.connect(server.host, server.port)
        say(f"connected: {code} {_text(message)}")
        code, message = smtp.ehlo()
        say(f"EHLO: {code} {_text(message).splitlines()[0]}")
        if server.security == "starttls":
            code, message = smtp.starttls(context=context)
            say(f"STARTTLS: {code} {_text(message)}")
            smtp.ehlo()
    except (OSError, smtplib.SMTPException) as exc:
        _close(smtp)
        raise LoginFailed(f"{server.label}: cannot connect: {_why(exc)}") from None
    try:
        name = mechanism.upper()
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        if name not in offered:
            raise LoginFailed(
                f"{server.label} does not offer {name} (it offers {' '.join(offered) or 'none'})",
                "try the other --mechanism",
            )
        raw = initial_response(user, token, mechanism, server)
        line = f"AUTH {name} {sasl.encode(raw)}"
        inline = len(line) + 2 <= MAX_INITIAL_RESPONSE_LINE
        how = "with the initial response" if inline else "then the response after 334"
        say(f"AUTH {name} as {user} ({how})")
        conversation = _Conversation(raw, mechanism, say)
        try:
            code, message = smtp.auth(name, conversation, initial_response_ok=inline)
        except smtplib.SMTPAuthenticationError as exc:
            answer = f"{exc.smtp_code} {_text(exc.smtp_error)}"
            say(f"rejected: {answer}")
            raise LoginFailed(
                f"{server.label}: the server rejected the token: {answer}",
                tokeninfo.advice("SMTP", answer, token, user)
                or REJECTED_HINT.format(protocol="SMTP"),
            ) from None
        say(f"authenticated: {code} {_text(message)}")
        code, message = smtp.quit()
        say(f"QUIT: {code} {_text(message)}")
    except (OSError, smtplib.SMTPException) as exc:
        raise LoginFailed(f"{server.label}: connection lost: {_why(exc)}") from None
    finally:
        _close(smtp)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _words(data: Sequence[object] | None) -> str:
    return " ".join(_text(item) for item in data or [] if isinstance(item, bytes | str))


def _imap_error(exc: imaplib.IMAP4.error) -> str:
    # imaplib words it "AUTHENTICATE command error: NO [b'...']"; keep the server's part.
    text = str(exc)
    _, _, tail = text.partition("error: ")
    status, _, rest = (tail or text).partition(" ")
    if rest.startswith("[b'") and rest.endswith("']"):
        rest = rest[3:-2]
    return f"{status} {rest}".strip()


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.verify_message}; set tls_ca_file for a server with a private certificate"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _close(conn: imaplib.IMAP4 | smtplib.SMTP) -> None:
    try:
        if isinstance(conn, imaplib.IMAP4):
            conn.shutdown()
        else:
            conn.close()
    except OSError:
        pass


def main(
    account: str,
    *,
    socket_path: str | None,
    mechanism: str,
    only: str | None,
    timeout: float,
    out: TextIO = sys.stdout,
) -> int:
    """
    Run `mailoauth test`; returns the exit status (0 when every login succeeded).

    Args:
        account: the account's name.
        socket_path: the daemon's socket (--socket), or None for the defaults.
        mechanism: "xoauth2" or "oauthbearer".
        only: "imap" or "smtp" to check one of them, None for both.
        timeout: seconds for each network step.
        out: where the steps are printed.

    Raises:
        MailoauthdError: the daemon could not give the servers or a token, or a login failed.
    """

    def say(text: str) -> None:
        out.write(f"  {text}\n")
        out.flush()

    request = {"v": protocol.VERSION, "op": "servers", "account": account}
    info = transport.request_reply(protocol.encode(request), socket_path, timeout + 5)
    servers = [
        parse_server("IMAP", info.get("imap_server"), info.get("imap_security")),
        parse_server("SMTP", info.get("smtp_server"), info.get("smtp_security")),
    ]
    wanted = [s for s in servers if s is not None and only in (None, s.protocol.lower())]
    if not wanted:
        which = f"{only}_server" if only else "imap_server or smtp_server"
        raise errors.MailoauthdError(
            f"{account}: no {which} is configured (set it in [accounts.{account}], "
            "e.g. imap_server = 'outlook.office365.com:993')"
        )
    user = str(info.get("username") or "")
    ca_file = info.get("tls_ca_file")
    ca = ca_file if isinstance(ca_file, str) else None
    out.write(f"{account}: asking mailoauthd for a token\n")
    reply = transport.request_reply(
        protocol.encode_token_request(account, min_validity=-1.0, timeout=timeout),
        socket_path,
        timeout + transport.ANSWER_GRACE,
    )
    token = reply.get("token")
    if not isinstance(token, str) or not token:
        raise errors.MailoauthdError(f"{account}: the daemon sent no token")
    expires = reply.get("expires_at")
    left = f", valid for {expires - time.time():.0f} s" if isinstance(expires, int) else ""
    say(f"got a token of {len(token)} characters for {user}{left}")
    failed: list[LoginFailed] = []
    for server in wanted:
        out.write(f"{server.label}\n")
        check = check_imap if server.protocol == "IMAP" else check_smtp
        try:
            check(server, user, token, mechanism=mechanism, ca_file=ca, timeout=timeout, say=say)
        except LoginFailed as exc:
            say(f"FAILED: {exc}")
            failed.append(exc)
    if failed:
        first = failed[0]
        hint = f" ({first.hint})" if first.hint else ""
        raise errors.MailoauthdError(f"{account}: {first}{hint}")
    names = " and ".join(s.protocol for s in wanted)
    out.write(f"{account}: {names} login with {mechanism.upper()} succeeded\n")
    return 0
