"""
Who may do what: a peer's credentials against the daemon's mode, its administrators and
each account's allow lists. Decisions are pure; only `Policy.build` asks the user database.

Per-user mode: the server admits only the daemon's own uid and root, and they may do
everything; nothing here is consulted.

System mode: every local user reaches the socket, and each request is decided here.

    peer                          token of A          status           anything else
    root, the daemon's own user   yes                 every account    yes
    admin_group member            if allowed on A     every account    yes
    allowed on A (user or group)  yes                 the accounts     no
                                                      it is allowed
    anyone else                   no                  nothing          no

An account without allow lists is served to root and the daemon's user only. A refused
token request is answered the same whether the account exists or not, so that a local
user cannot learn the names of other people's accounts by asking.

Groups are the peer's own, as the kernel recorded them when it connected (SO_PEERGROUPS,
see server.peer_of): the same groups that decide what it may open on disk. The user
database (getgrouplist) can disagree with a running process in both directions: a
process started before its user joined a group, or one that dropped its groups
(`setpriv --clear-groups`, a sandboxed service). /proc/PID/status would be racy (the
pid may be reused once the peer exits) and is hidden by ProtectProc=invisible.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from mailoauthd.config import Config
from mailoauthd.errors import AccessDenied
from mailoauthd.serve.ops import OPS, Access

REFUSAL_HINT = (
    "if you should have it, ask the administrator of this mailoauthd to add you "
    "to the account's allow_users or allow_groups"
)


class Peer(Protocol):
    """What the kernel says about the other end (server.Peer is one)."""

    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def groups(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused request: what the peer is told, and what the log says."""

    error: AccessDenied
    reason: str  # for the log only: may say that the account exists


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Access rules with every name resolved to an id."""

    system: bool
    own_uid: int
    admin_gid: int | None = None
    # Anyone but root and the daemon's user has rights: the socket must be open to them.
    shared: bool = False
    # account -> the uids and gids that may have its tokens; every account has an entry.
    users: Mapping[str, frozenset[int]] = field(default_factory=lambda: MappingProxyType({}))
    groups: Mapping[str, frozenset[int]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, cfg: Config, *, system: bool, own_uid: int) -> tuple[Policy, list[str]]:
        """
        Resolve the configuration's user and group names (the one place this module does I/O).

        Args:
            cfg: the configuration.
            system: system mode; in per-user mode allow lists have no effect.
            own_uid: the daemon's effective uid.

        Returns:
            The policy, and a warning for every name that is not a user or group here
            (it is ignored until it exists and the configuration is reloaded).
        """
        warnings: list[str] = []

        def resolve(where: str, names: tuple[str | int, ...], kind: str) -> frozenset[int]:
            ids = set()
            for name in names:
                if isinstance(name, int):
                    ids.add(name)
                    continue
                try:
                    ids.add(
                        pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
                    )
                except KeyError:
                    warnings.append(
                        f"{cfg.source}: {where}: there is no {kind} {name!r} on this system; "
                        "ignored until it exists and mailoauthd is reloaded"
                    )
            return frozenset(ids)

        admin = cfg.daemon.admin_group
        admin_gid = None
        if admin is not None:
            admin_gid = next(iter(resolve("[daemon] admin_group", (admin,), "group")), None)
        users = {}
        groups = {}
        for name, account in cfg.accounts.items():
            table = f"[accounts.{name}]"
            users[name] = resolve(f"{table} allow_users", account.allow_users, "user")
            groups[name] = resolve(f"{table} allow_groups", account.allow_groups, "group")
        if not system and (admin is not None or any(users.values()) or any(groups.values())):
            warnings.append(
                f"{cfg.source}: admin_group, allow_users and allow_groups apply in system mode "
                "only; this per-user mailoauthd serves its own user and root"
            )
        shared = admin is not None or any(
            account.allow_users or account.allow_groups for account in cfg.accounts.values()
        )
        policy = cls(
            system=system,
            own_uid=own_uid,
            admin_gid=admin_gid,
            shared=system and shared,
            users=MappingProxyType(users),
            groups=MappingProxyType(groups),
        )
        return policy, warnings

    def is_owner(self, peer: Peer) -> bool:
        """Root and the daemon's own user: everything, every token."""
        return peer.uid in (0, self.own_uid) or not self.system

    def is_admin(self, peer: Peer) -> bool:
        """May manage every account: the owners, and members of admin_group."""
        if self.is_owner(peer):
            return True
        return self.admin_gid is not None and self.admin_gid in (peer.gid, *peer.groups)

    def may_use(self, peer: Peer, account: str) -> bool:
        """May have the account's tokens (an unknown account: nobody but the owners)."""
        if self.is_owner(peer):
            return True
        users = self.users.get(account)
        if users is None:
            return False
        return peer.uid in users or not self.groups[account].isdisjoint((peer.gid, *peer.groups))

    def visible(self, peer: Peer, account: str) -> bool:
        """May see the account in `status`."""
        return self.is_admin(peer) or self.may_use(peer, account)

    def refusal(self, op: str, name: str | None, peer: Peer) -> Refusal | None:
        """
        Why this peer may not make this request (`op` on account `name`), or None when it may.

        The request was checked before (request.parse): `op` is a row of ops.OPS,
        and an operation on one account has its name.
        """
        if self.is_owner(peer):
            return None
        # The row's access class (ops.py): `status` is open, and shows each peer its own.
        access = OPS[op].access
        if access is Access.OPEN:
            return None
        if access is Access.ACCOUNT:
            if name is None or self.may_use(peer, name):
                return None
            known = name in self.users
            if known and self.is_admin(peer):
                # Administrators see every account in `status` anyway: say what is wrong.
                return Refusal(
                    AccessDenied(
                        f"{name}: uid {peer.uid} administers this mailoauthd but is not in "
                        "the account's allow_users or allow_groups",
                        hint="add it there to use the account's tokens",
                    ),
                    reason="administrator, not on the allow lists",
                )
            return Refusal(
                AccessDenied(
                    f"uid {peer.uid} may not use this mailoauthd for {name!r}, "
                    "or there is no such account",
                    hint=REFUSAL_HINT,
                ),
                reason="not on the allow lists" if known else "no such account",
            )
        if self.is_admin(peer):
            return None
        return Refusal(
            AccessDenied(
                f"'{op}' is for the administrators of this mailoauthd, and uid {peer.uid} "
                "is not one",
                hint="ask root, or a member of its admin_group",
            ),
            reason="not an administrator",
        )
