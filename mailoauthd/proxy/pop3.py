"""
The POP3 proxy (RFC 1939, RFC 5034): USER/PASS and AUTH PLAIN to the client, XOAUTH2
or OAUTHBEARER upstream, then the connection spliced. Answers carry RFC 3206 codes.
"""

from __future__ import annotations

from mailoauthd.proxy.common import (
    MAX_COMMANDS,
    Denied,
    LineReader,
    Outcome,
    plain_credentials,
)
from mailoauthd.proxy.service import Client


def _capabilities(client: Client) -> list[str]:
    words = ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if client.tls is not None and not client.encrypted:
        words.append("STLS")
    if not client.must_encrypt or client.encrypted:
        words += ["USER", "SASL PLAIN"]
    return words


def _answer(denied: Denied) -> str:
    if denied.outcome == Outcome.UNAVAILABLE:
        return f"-ERR [SYS/TEMP] {denied.text}"
    return f"-ERR [AUTH] {denied.text}"


async def handle(client: Client) -> None:
    reader = LineReader(client.stream)
    await client.send("+OK mailoauthd POP3 proxy ready")
    user: str | None = None
    for _ in range(MAX_COMMANDS):
        text = await client.command(reader, "-ERR line too long")
        if text is None:
            return
        command, _, argument = text.partition(" ")
        command = command.upper()
        credentials: tuple[str, str] | None = None
        if command == "CAPA":
            await client.send(
                "+OK capabilities follow\r\n" + "\r\n".join(_capabilities(client)) + "\r\n."
            )
        elif command == "QUIT":
            await client.send("+OK bye")
            return
        elif command == "NOOP":
            await client.send("+OK")
        elif command == "STLS":
            if client.tls is None or client.encrypted:
                await client.send("-ERR STLS is not available")
                continue
            await client.send("+OK begin TLS negotiation")
            started = await client.starttls(reader)
            if started is None:
                return
            reader = started
            user = None
        elif command in ("USER", "PASS", "AUTH") and client.must_encrypt and not client.encrypted:
            await client.send("-ERR [AUTH] use STLS first")
        elif command == "USER" and argument:
            user = argument
            await client.send("+OK send the password")
        elif command == "PASS" and argument:
            if user is None:
                await client.send("-ERR USER first")
                continue
            credentials = (user, argument)
            user = None
        elif command == "AUTH" and not argument:
            await client.send("+OK mechanisms follow\r\nPLAIN\r\n.")
        elif command == "AUTH":
            mechanism, _, response = argument.partition(" ")
            if mechanism.upper() != "PLAIN":
                await client.send("-ERR only AUTH PLAIN is offered")
                continue
            if not response:
                await client.send("+ ")
                response = (
                    (await reader.line(client.read_timeout)).decode("utf-8", "replace").strip()
                )
                if response == "*":
                    await client.send("-ERR authentication cancelled")
                    continue
            credentials = plain_credentials(response.encode())
            if credentials is None:
                await client.send("-ERR malformed PLAIN response")
        else:
            await client.send("-ERR not available before login")
        if credentials is None:
            continue
        try:
            name, session = await client.proxy.login(client, *credentials)
        except Denied as denied:
            await client.send(_answer(denied))
            continue
        await client.relay(reader, name, session, session.success)
        return
    await client.send("-ERR too many commands before login")
