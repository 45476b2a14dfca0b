"""
The SMTP submission proxy (RFC 5321, RFC 4954): AUTH PLAIN and AUTH LOGIN to the
client, XOAUTH2 or OAUTHBEARER upstream, then the connection spliced.

The EHLO answer is the proxy's own, given before the account (and so the upstream) is
known: the extensions every submission server this is meant for offers (8BITMIME,
PIPELINING, CHUNKING, SMTPUTF8, ENHANCEDSTATUSCODES). After AUTH the client talks to
the upstream directly.
"""

from __future__ import annotations

import socket

from mailoauthd.proxy.common import (
    MAX_COMMANDS,
    Denied,
    LineReader,
    Outcome,
    b64text,
    plain_credentials,
)
from mailoauthd.proxy.service import Client

_USERNAME = "334 VXNlcm5hbWU6"  # "Username:"
_PASSWORD = "334 UGFzc3dvcmQ6"  # "Password:"  # noqa: S105 (a prompt)


def _ehlo(client: Client, name: str) -> str:
    lines = [f"{socket.gethostname()} greets {name}"]
    if client.tls is not None and not client.encrypted:
        lines.append("STARTTLS")
    if not client.must_encrypt or client.encrypted:
        lines.append("AUTH PLAIN LOGIN")
    lines += ["8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING", "CHUNKING", "SMTPUTF8"]
    return "\r\n".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
    )


def _answer(denied: Denied) -> str:
    if denied.outcome == Outcome.UNAVAILABLE:
        return f"454 4.7.0 {denied.text}"
    if denied.outcome == Outcome.REFUSED and denied.text[:1] == "5" and denied.text[1:3].isdigit():
        return denied.text  # the upstream's own code, e.g. 535 5.7.139, with our hint
    return f"535 5.7.8 {denied.text}"


async def handle(client: Client) -> None:
    reader = LineReader(client.stream)
    await client.send(f"220 {socket.gethostname()} ESMTP mailoauthd SMTP proxy")
    helo: str | None = None

    async def response(prompt: str) -> str | None:
        await client.send(prompt)
        line = (await reader.line(client.read_timeout)).decode("utf-8", "replace").strip()
        return None if line == "*" else line

    for _ in range(MAX_COMMANDS):
        text = await client.command(reader, "500 5.5.2 line too long")
        if text is None:
            return
        command, _, argument = text.partition(" ")
        command = command.upper()
        credentials: tuple[str, str] | None = None
        if command == "EHLO" and argument:
            helo = argument.split()[0]
            await client.send(_ehlo(client, helo))
        elif command == "HELO" and argument:
            helo = argument.split()[0]
            await client.send(f"250 {socket.gethostname()}")
        elif command in ("RSET", "NOOP"):
            await client.send("250 2.0.0 OK")
        elif command == "QUIT":
            await client.send("221 2.0.0 bye")
            return
        elif command == "STARTTLS":
            if client.tls is None or client.encrypted:
                await client.send("502 5.5.1 STARTTLS is not available")
                continue
            await client.send("220 2.0.0 ready to start TLS")
            started = await client.starttls(reader)
            if started is None:
                return
            reader = started
            helo = None
        elif command == "AUTH":
            if helo is None:
                await client.send("503 5.5.1 EHLO first")
                continue
            if client.must_encrypt and not client.encrypted:
                await client.send("530 5.7.0 must issue a STARTTLS command first")
                continue
            mechanism, _, initial = argument.partition(" ")
            mechanism = mechanism.upper()
            if mechanism == "PLAIN":
                given = initial or await response("334 ")
                if given is None:
                    await client.send("501 5.7.0 authentication cancelled")
                    continue
                credentials = plain_credentials(given.encode())
            elif mechanism == "LOGIN":
                user_b64 = initial or await response(_USERNAME)
                password_b64 = None if user_b64 is None else await response(_PASSWORD)
                if user_b64 is None or password_b64 is None:
                    await client.send("501 5.7.0 authentication cancelled")
                    continue
                user, password = b64text(user_b64.encode()), b64text(password_b64.encode())
                credentials = (user, password) if user and password else None
            else:
                await client.send("504 5.5.4 only AUTH PLAIN and AUTH LOGIN are offered")
                continue
            if credentials is None:
                await client.send("501 5.5.2 malformed authentication response")
                continue
        elif command in ("MAIL", "RCPT", "DATA", "BDAT"):
            await client.send("530 5.7.0 authentication required")
        else:
            await client.send("502 5.5.2 not available before authentication")
        if credentials is None:
            continue
        try:
            name, session = await client.proxy.login(client, *credentials, helo=helo or "localhost")
        except Denied as denied:
            await client.send(_answer(denied))
            continue
        await client.relay(reader, name, session, session.success)
        return
    await client.send("421 4.7.0 too many commands before authentication")
