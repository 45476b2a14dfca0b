"""
A Postfix socketmap (socketmap_table(5)) that answers SASL password lookups with tokens.

Requests and replies are netstrings ("LEN:DATA,"). A request is "sasl KEY", where KEY
is what Postfix's smtp client looks up in smtp_sasl_password_maps: the sender address
(smtp_sender_dependent_authentication), the next hop ("[host]:port") or the remote
host name. The reply is "OK username:ACCESS_TOKEN" for the account whose `username`
or one of whose `socketmap_keys` is KEY (case-insensitive), "NOTFOUND " otherwise,
"TEMP reason" when no valid token can be had now, and "PERM reason" for a map name
other than "sasl". A peer that may not have the account's tokens (the same rules as
on the main socket) gets "NOTFOUND ", whether the account exists or not.
"""

from __future__ import annotations

import socket as stdsocket
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

from mailoauthd.errors import MailoauthdError, ReauthorizationRequired, helper_command
from mailoauthd.proxy.common import MAX_CONNECTIONS, READ_TIMEOUT, Closed
from mailoauthd.proxy.service import TOKEN_TIMEOUT, Tokens
from mailoauthd.serve.server import Peer, peer_of

log = structlog.get_logger(__name__)

MAP_NAME = "sasl"
# Postfix's own limit on requests (socketmap_max_reply_size bounds replies, 100000).
MAX_REQUEST = 10000


class BadNetstring(Exception):
    pass


async def read_netstring(stream: trio.SocketStream, buffer: bytearray, seconds: float) -> bytes:
    """The next netstring's payload; raises Closed, BadNetstring or trio.TooSlowError."""
    with trio.fail_after(seconds):
        while True:
            colon = buffer.find(b":")
            if colon > 5 or (colon < 0 and len(buffer) > 5):
                raise BadNetstring("length too long")
            if colon >= 0:
                digits = bytes(buffer[:colon])
                if not digits.isdigit():
                    raise BadNetstring("length not a number")
                size = int(digits)
                if size > MAX_REQUEST:
                    raise BadNetstring("request too long")
                end = colon + 1 + size
                if len(buffer) > end:
                    if buffer[end : end + 1] != b",":
                        raise BadNetstring("no comma")
                    payload = bytes(buffer[colon + 1 : end])
                    del buffer[: end + 1]
                    return payload
            data = await stream.receive_some(MAX_REQUEST + 16)
            if not data:
                raise Closed
            buffer += data


def netstring(text: str) -> bytes:
    data = text.encode("utf-8")
    return str(len(data)).encode() + b":" + data + b","


class Socketmap:
    """Serves the socketmap on a bound Unix socket."""

    def __init__(
        self,
        tokens: Tokens,
        may_use: Callable[[Peer, str], bool],
        *,
        groups: bool = False,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.tokens = tokens
        self.may_use = may_use
        self.groups = groups
        self.read_timeout = read_timeout
        self.open = 0

    async def serve(
        self,
        sock: stdsocket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self.open >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        try:
            peer = peer_of(stream.socket, groups=self.groups)
            buffer = bytearray()
            while True:
                request = await read_netstring(stream, buffer, self.read_timeout)
                reply = await self.answer(request.decode("utf-8", "replace"), peer)
                await stream.send_all(netstring(reply))
        except (Closed, BadNetstring, trio.TooSlowError, trio.BrokenResourceError, OSError):
            pass
        except Exception:  # a bug must end one connection, never the daemon
            log.exception("socketmap.connection_failed")
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    def _find(self, key: str) -> str | None:
        wanted = key.casefold()
        for name in self.tokens.names:
            account = self.tokens.account(name)
            if (account.username or "").casefold() == wanted or any(
                k.casefold() == wanted for k in account.socketmap_keys
            ):
                return name
        return None

    async def answer(self, request: str, peer: Peer) -> str:
        """The reply to one request "NAME KEY"."""
        name, _, key = request.partition(" ")
        if name != MAP_NAME:
            return f"PERM unknown map {name[:60]!r}; mailoauthd serves '{MAP_NAME}'"
        account = self._find(key)
        if account is None:
            return "NOTFOUND "
        if not self.may_use(peer, account):
            log.info("socketmap.refused", uid=peer.uid, pid=peer.pid, account=account)
            return "NOTFOUND "
        try:
            state = self.tokens.token_now(account, None)
            if state is None:
                deadline = trio.current_time() + TOKEN_TIMEOUT
                with trio.move_on_at(deadline):
                    state = await self.tokens.token(account, None, deadline)
        except ReauthorizationRequired:
            log.warning("socketmap.needs_authorization", account=account)
            return f"TEMP {account} needs authorization: run {helper_command('authorize', account)}"
        except MailoauthdError as exc:
            return "TEMP " + " ".join(exc.message.split())[:300]
        if state is None or state.access_token is None:
            return f"TEMP {account}: no valid token within {TOKEN_TIMEOUT:g} s"
        username = self.tokens.account(account).username or ""
        log.info("socketmap.served", account=account, uid=peer.uid, pid=peer.pid)
        return f"OK {username}:{state.access_token.reveal()}"


def socket_path_note(path: Path) -> str:
    return f"socketmap:unix:{path}:{MAP_NAME}"
