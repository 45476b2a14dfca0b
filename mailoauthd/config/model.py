"""
What a configuration is once checked: frozen, typed settings for the daemon, the proxy,
the store, each OAuth profile (Provider) and each account.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mailoauthd.config.secrets import SecretSource
from mailoauthd.flows import Flow
from mailoauthd.secret import Secret


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    refresh_interval: timedelta = timedelta(minutes=3)
    refresh_before: timedelta = timedelta(minutes=10)
    refresh_spread: timedelta = timedelta(seconds=30)
    max_concurrent_refreshes: int = 8
    request_timeout: timedelta = timedelta(seconds=30)
    min_validity: timedelta = timedelta(seconds=60)
    socket: Path | None = None  # None: the mode's default
    state_dir: Path | None = None
    log_format: str = "auto"
    log_level: str = "info"
    # System mode: members of this group may manage every account (not read its tokens).
    admin_group: str | int | None = None
    # `mailoauth status --check` fails for an account failing this long. 15 min: past
    # the default refresh_before (10 min), so the last access token has expired by
    # then and mail programs fail; a shorter outage is bridged by that token.
    unhealthy_after: timedelta = timedelta(minutes=15)
    # Run (argv) when an account newly needs a person, and every notify_interval
    # until it is fixed; per account too. 6 h: a few reminders a working day.
    notify_command: tuple[str, ...] | None = None
    notify_interval: timedelta = timedelta(hours=6)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """[store]: where grants are kept, and the key that seals them (mailoauthd/storage/store.py)."""

    backend: str = "files"
    encryption_key_file: Path | None = None  # "$VAR" and "${VAR}" are expanded when read
    encryption_key_command: tuple[str, ...] | None = None  # argv, never a shell string
    # backend "etcd" only (docs/fleet.md): the cluster, where under it, and how to log in.
    endpoints: tuple[str, ...] = ()
    prefix: str = "/mailoauthd/"
    ca_file: Path | None = None  # "$VAR" and "${VAR}" are expanded when read, as for secrets
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    # 10 s: a dead leader is replaced within this plus one check, while a leader
    # under load (or etcd electing its own leader, ~1 s) does not lose it by accident.
    lease_ttl: timedelta = timedelta(seconds=10)


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    """An OAuth profile, one app registration, with its preset's values filled in."""

    name: str
    preset: str = "generic"
    client_id: str
    client_secret: SecretSource | None = None
    scopes: tuple[str, ...] = ()
    tenant: str | None = None
    cloud: str | None = None
    issuer: str | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    token_auth_method: str = "client_secret_post"  # noqa: S105 (a method's name)
    # Mappings cannot be hashed; leaving them out keeps these objects usable as keys.
    authorize_params: Mapping[str, str] = field(default_factory=_empty, hash=False)
    redirect_port: int | None = None  # None: a random free port for each sign-in
    testing: bool = False  # google: the app is in "testing" status (7-day refresh tokens)
    # Known cut-offs of a refresh token: since it was issued, and since it was last used.
    refresh_token_max_age: timedelta | None = None
    refresh_token_max_idle: timedelta | None = None
    # The lifetime assumed for an access token whose answer names none (no
    # expires_in) and which is no JWT with an `exp` claim: short on purpose.
    default_expires_in: timedelta = timedelta(minutes=15)
    # Not a configuration key: discovery sets it when the issuer's metadata says its
    # authorization responses carry `iss` (RFC 9207), which sign-ins then require.
    authorization_response_iss: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    name: str
    provider: Provider
    username: str | None = None
    flow: Flow = Flow.AUTHORIZATION_CODE
    scopes: tuple[str, ...] = ()
    refresh_before: timedelta = timedelta(minutes=10)
    min_validity: timedelta = timedelta(seconds=60)
    # System mode: who besides root and the daemon's user may have the tokens;
    # user/group names, or numeric ids.
    allow_users: tuple[str | int, ...] = ()
    allow_groups: tuple[str | int, ...] = ()
    # Where `mailoauth test` logs in: "host:port"; the preset's servers by default.
    imap_server: str | None = None
    smtp_server: str | None = None
    # "tls" (implicit), "starttls" or "none" (loopback only); None: tls on 993/465,
    # starttls elsewhere.
    imap_security: str | None = None
    smtp_security: str | None = None
    tls_ca_file: Path | None = None  # trust this CA (a private or self-signed server)
    # The current access token also kept in this file, replaced atomically on each
    # refresh, for programs that read a password file (fetchmail) instead of a command.
    token_file: Path | None = None
    token_file_owner: str | int | None = None
    token_file_group: str | int | None = None
    token_file_mode: int = 0o600
    notify_command: tuple[str, ...] | None = None  # the [daemon] value unless set here
    notify_interval: timedelta = timedelta(hours=6)
    # The proxy (mailoauthd/proxy): the local password its clients log in with
    # (proxy_password_file or proxy_password_command), POP3's upstream, and the
    # extra keys the Postfix socketmap answers for this account.
    proxy_password: SecretSource | None = None
    pop3_server: str | None = None
    pop3_security: str | None = None
    socketmap_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """[proxy]: local IMAP/POP3/SMTP listeners ("host:port") and the Postfix socketmap."""

    imap: str | None = None
    pop3: str | None = None
    smtp: str | None = None
    socketmap: Path | None = None
    tls_certificate_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        """Whether any listener or the socketmap is configured (else proxy/ is not loaded)."""
        return any((self.imap, self.pop3, self.smtp, self.socketmap))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    providers: Mapping[str, Provider] = field(default_factory=_empty, hash=False)
    accounts: Mapping[str, Account] = field(default_factory=_empty, hash=False)
    # Advice about the configuration, not part of it.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def proxy_passwords(self, env: Mapping[str, str] | None = None) -> dict[str, Secret]:
        """Every account's proxy password, read now (files, commands), like the client secrets."""
        return {
            name: account.proxy_password.read(
                where=f"{self.source}: [accounts.{name}] "
                + account.proxy_password.key.replace("client_secret", "proxy_password"),
                env=env,
            )
            for name, account in self.accounts.items()
            if account.proxy_password is not None
        }
