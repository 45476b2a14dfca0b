"""
The IMAP proxy (RFC 3501): LOGIN and AUTHENTICATE PLAIN to the client, XOAUTH2 or
OAUTHBEARER upstream, then the connection spliced.

Before the login the proxy speaks a small part of IMAP itself: CAPABILITY, NOOP,
LOGOUT, STARTTLS (with a certificate), LOGIN, AUTHENTICATE PLAIN (with SASL-IR) and
ID. Literals ({n} and {n+}) are accepted up to MAX_LITERAL bytes.
"""

from __future__ import annotations

import re

from mailoauthd.proxy.common import (
    MAX_COMMANDS,
    Denied,
    LineReader,
    Outcome,
    plain_credentials,
)
from mailoauthd.proxy.service import Client

MAX_LITERAL = 1024
_TAG = re.compile(r"[!#$&'*+,\-./0-9:;<=>?@A-Z^_`a-z|~]{1,64}")
_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(\{\d{1,5}\+?\})$|([^\s"(){]+))')


def capabilities(client: Client) -> str:
    words = ["IMAP4rev1", "SASL-IR", "ID"]
    if client.tls is not None and not client.encrypted:
        words.append("STARTTLS")
    if client.must_encrypt and not client.encrypted:
        words.append("LOGINDISABLED")
    else:
        words.append("AUTH=PLAIN")
    return " ".join(words)


async def _arguments(client: Client, reader: LineReader, text: str) -> list[str] | None:
    """The arguments of a command line, literals read from the client; None if malformed."""
    args: list[str] = []
    while True:
        position = 0
        literal = None
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if match is None:
                return None
            quoted, literal, atom = match.groups()
            position = match.end()
            if quoted is not None:
                args.append(re.sub(r"\\(.)", r"\1", quoted))
            elif atom is not None:
                args.append(atom)
        if literal is None:
            return args
        size = int(literal.strip("{}+"))
        if size > MAX_LITERAL:
            return None
        if not literal.endswith("+}"):
            await client.send("+ Ready for literal data")
        data = await reader.exactly(size, client.read_timeout)
        args.append(data.decode("utf-8", "replace"))
        text = (await reader.line(client.read_timeout)).decode("utf-8", "replace").rstrip("\r\n")


def _answer(tag: str, denied: Denied) -> str:
    if denied.outcome == Outcome.UNAVAILABLE:
        return f"{tag} NO [UNAVAILABLE] {denied.text}"
    return f"{tag} NO [AUTHENTICATIONFAILED] {denied.text}"


async def handle(client: Client) -> None:
    reader = LineReader(client.stream)
    await client.send(f"* OK [CAPABILITY {capabilities(client)}] mailoauthd IMAP proxy ready")
    for _ in range(MAX_COMMANDS):
        text = await client.command(reader, "* BYE line too long")
        if text is None:
            return
        tag, _, rest = text.partition(" ")
        command, _, text = rest.partition(" ")
        command = command.upper()
        if not _TAG.fullmatch(tag) or not command:
            await client.send("* BAD malformed command")
            continue
        if command == "CAPABILITY":
            await client.send(f"* CAPABILITY {capabilities(client)}")
            await client.send(f"{tag} OK CAPABILITY completed")
        elif command == "NOOP":
            await client.send(f"{tag} OK NOOP completed")
        elif command == "ID":
            await client.send('* ID ("name" "mailoauthd")')
            await client.send(f"{tag} OK ID completed")
        elif command == "LOGOUT":
            await client.send("* BYE logging out")
            await client.send(f"{tag} OK LOGOUT completed")
            return
        elif command == "STARTTLS":
            if client.tls is None or client.encrypted:
                await client.send(f"{tag} BAD STARTTLS is not available")
                continue
            await client.send(f"{tag} OK begin TLS negotiation now")
            started = await client.starttls(reader)
            if started is None:
                return
            reader = started
        elif command in ("LOGIN", "AUTHENTICATE"):
            if client.must_encrypt and not client.encrypted:
                await client.send(f"{tag} NO [PRIVACYREQUIRED] use STARTTLS first")
                continue
            credentials = await _credentials(client, reader, tag, command, text)
            if credentials is None:
                continue
            try:
                name, session = await client.proxy.login(client, *credentials)
            except Denied as denied:
                await client.send(_answer(tag, denied))
                continue
            await client.relay(reader, name, session, f"{tag} {session.success}")
            return
        else:
            await client.send(f"{tag} BAD {command} is not available before login")
    await client.send("* BYE too many commands before login")


async def _credentials(
    client: Client, reader: LineReader, tag: str, command: str, text: str
) -> tuple[str, str] | None:
    args = await _arguments(client, reader, text)
    if command == "LOGIN":
        if args is None or len(args) != 2 or not args[0] or not args[1]:
            await client.send(f"{tag} BAD LOGIN needs a user name and a password")
            return None
        return args[0], args[1]
    if args is None or not args or args[0].upper() != "PLAIN" or len(args) > 2:
        await client.send(f"{tag} NO [CANNOT] only AUTHENTICATE PLAIN is offered")
        return None
    if len(args) == 2:
        response = args[1].encode()
    else:
        await client.send("+ ")
        response = (await reader.line(client.read_timeout)).rstrip(b"\r\n")
        if response == b"*":
            await client.send(f"{tag} BAD authentication cancelled")
            return None
    credentials = plain_credentials(response)
    if credentials is None:
        await client.send(f"{tag} BAD malformed PLAIN response")
    return credentials
