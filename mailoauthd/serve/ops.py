"""
The socket's operations: one table, read by everything that treats them differently.

    request.parse     an op in the table; the keys its row says it cannot do without
    access.Policy     who may ask (the row's `access`), in system mode
    server.Server     a conversation gets a Channel; a waiting op is given up on hang-up
    handlers.Handlers the row's `handler` method answers it
    docs/protocol.md  its "Operations" table; tests/test_ops.py holds them to each other

A new operation is a row here, its handler method, its tests and its section in
docs/protocol.md; nothing else changes. The names are API: never rename one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class Access(enum.Enum):
    """Who may make a request in system mode (access.py); per-user mode lets its owner do all."""

    OPEN = "anyone"  # anyone who reaches the socket
    ACCOUNT = "account"  # root, the daemon's user, and those on the account's allow lists
    ADMIN = "admin"  # root, the daemon's user, and members of admin_group


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One operation and how each part of the daemon treats it."""

    name: str
    handler: str  # the handlers.Handlers method that answers it
    access: Access
    account: bool = False  # names one account, and must
    requires: tuple[str, ...] = ()  # further request keys it cannot do without
    waits: bool = False  # may wait long (a refresh): given up when the client hangs up
    conversation: bool = False  # talks back and forth: its handler gets a server.Channel


OPS: Mapping[str, Op] = MappingProxyType(
    {
        op.name: op
        for op in (
            Op(name="token", handler="token", access=Access.ACCOUNT, account=True, waits=True),
            Op(name="status", handler="status", access=Access.OPEN),
            Op(name="refresh", handler="refresh", access=Access.ADMIN, account=True, waits=True),
            Op(
                name="import",
                handler="import_token",
                access=Access.ADMIN,
                account=True,
                requires=("refresh_token",),
                waits=True,
            ),
            Op(name="revoke", handler="revoke", access=Access.ADMIN, account=True),
            Op(name="ping", handler="ping", access=Access.OPEN),
            Op(name="servers", handler="servers", access=Access.ACCOUNT, account=True),
            Op(name="reload", handler="reload", access=Access.ADMIN),
            Op(
                name="authorize",
                handler="authorize",
                access=Access.ADMIN,
                account=True,
                conversation=True,
            ),
        )
    }
)
