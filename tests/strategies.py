"""Hypothesis strategies for mailoauthd's data: valid configurations built as objects."""

from __future__ import annotations

import string
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

from hypothesis import strategies as st

from mailoauthd.config import (
    FLOWS,
    Account,
    Config,
    DaemonSettings,
    Provider,
    SecretSource,
)
from mailoauthd.secret import Secret

ALNUM = string.ascii_letters + string.digits


def words(first: str, rest: str, max_rest: int) -> st.SearchStrategy[str]:
    """A character of `first`, then up to `max_rest` of `rest`: the regex [first][rest]{0,n}.

    Built from text() rather than from_regex(), which draws the same strings three to four
    times slower; a config is a few hundred such draws, and Hypothesis's too-slow health
    check then failed on a busy machine.
    """
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=max_rest))


names = words(ALNUM, ALNUM + "_.-", 15)
# Any printable text without whitespace, so each string is exactly one scope.
scopes = st.lists(
    st.text(st.characters(exclude_categories=("Z", "C")), min_size=1, max_size=20),
    unique=True,
    max_size=4,
).map(tuple)
non_blank = st.text(min_size=1, max_size=30).filter(str.strip)
# Whole seconds are written as "1h2m3s"; sub-second ones as a float of seconds.
durations = st.integers(0, 10**8).map(lambda s: timedelta(seconds=s)) | st.integers(0, 10**11).map(
    lambda us: timedelta(microseconds=us)
)
positive_durations = durations.filter(bool)
# Users and groups: names (never all digits: those are read as ids) or numeric ids.
# [a-z_][a-z0-9_.-]{0,15}\$?
principal_names = st.builds(
    str.__add__,
    words(string.ascii_lowercase + "_", string.ascii_lowercase + string.digits + "_.-", 15),
    st.sampled_from(["", "$"]),
)
principals = principal_names | st.integers(0, 2**32 - 2)
principal_lists = st.lists(principals, unique=True, max_size=3).map(tuple)
segments = words(ALNUM + "_-", ALNUM + "_.-", 10)
absolute_paths = st.lists(segments, min_size=1, max_size=4).map(lambda parts: Path("/", *parts))
urls = st.builds(
    "{}/{}".format,
    st.sampled_from(
        [
            "https://login.example.com",
            "https://sso.example.org:8443/realms/mail",
            "http://127.0.0.1:8080",
            "http://[::1]:9999",
            "http://localhost",
        ]
    ),
    st.text(ALNUM + "/_.-", max_size=20),
)
optional_urls = st.none() | urls
tenants = st.sampled_from(["common", "organizations", "consumers", "contoso.com"]) | st.uuids().map(
    str
)
secret_sources = st.one_of(
    st.builds(SecretSource, inline=non_blank.map(Secret)),
    st.builds(SecretSource, file=absolute_paths),
    st.builds(SecretSource, file=segments.map(lambda name: Path("${CREDENTIALS_DIRECTORY}", name))),
    st.builds(
        SecretSource,
        command=st.lists(st.text(max_size=10).filter(lambda w: "\0" not in w), max_size=3).map(
            lambda args: ("pass", *args)
        ),
    ),
)
reserved = {"response_type", "client_id", "redirect_uri", "scope", "state", "nonce"}
authorize_params = st.dictionaries(
    non_blank.filter(lambda key: key not in reserved and not key.startswith("code_")),
    non_blank,
    max_size=3,
).map(MappingProxyType)


@st.composite
def st_providers(draw: st.DrawFn, name: str) -> Provider:
    """A valid provider; explicit endpoints override a preset's, so any will do."""
    preset = draw(st.sampled_from(["microsoft", "google", "generic"]))
    microsoft = preset == "microsoft"
    # TOML has no null: a preset's endpoints can be overridden but not removed.
    preset_urls = optional_urls if preset == "generic" else urls
    token_endpoint = draw(preset_urls)
    issuer = (
        draw(urls if token_endpoint is None else optional_urls) if preset == "generic" else None
    )
    testing = preset == "google" and draw(st.booleans())
    # TOML has no null: a preset's (or testing's) cut-off can be changed, not removed.
    max_age = positive_durations if testing else st.none() | positive_durations
    max_idle = positive_durations if microsoft else st.none() | positive_durations
    return Provider(
        name=name,
        preset=preset,
        redirect_port=draw(st.none() | st.integers(1, 65535)),
        testing=testing,
        refresh_token_max_age=draw(max_age),
        refresh_token_max_idle=draw(max_idle),
        client_id=draw(non_blank),
        client_secret=draw(st.none() | secret_sources),
        scopes=draw(scopes),
        tenant=draw(tenants) if microsoft else None,
        cloud=draw(st.sampled_from(["global", "usgov", "china"])) if microsoft else None,
        issuer=issuer,
        authorization_endpoint=draw(preset_urls),
        token_endpoint=token_endpoint,
        device_authorization_endpoint=draw(preset_urls),
        revocation_endpoint=draw(optional_urls if preset != "google" else urls),
        token_auth_method=draw(st.sampled_from(["client_secret_post", "client_secret_basic"])),
        authorize_params=draw(authorize_params),
    )


def _allows_client_credentials(provider: Provider) -> bool:
    # A shared tenant is refused only with the preset's own token endpoint, which
    # `urls` never produces.
    return provider.client_secret is not None and provider.preset != "google"


argv = st.lists(st.text(max_size=10).filter(lambda w: "\0" not in w), max_size=3).map(
    lambda args: ("notify-send", *args)
)
servers = st.none() | st.builds(
    "{}:{}".format,
    st.sampled_from(["mail.example.com", "127.0.0.1", "[::1]"]),
    st.integers(1, 65535),
)
_PRESET_SERVERS = {
    ("microsoft", "global"): ("outlook.office365.com:993", "smtp.office365.com:587"),
    ("google", None): ("imap.gmail.com:993", "smtp.gmail.com:587"),
}
_PRESET_POP3 = {
    ("microsoft", "global"): "outlook.office365.com:995",
    ("google", None): "pop.gmail.com:995",
}


@st.composite
def st_accounts(
    draw: st.DrawFn, name: str, providers: list[Provider], daemon: DaemonSettings | None = None
) -> Account:
    """A valid account of one of `providers`; it inherits what `daemon` sets and it does not."""
    provider = draw(st.sampled_from(providers))
    flows = [f for f in FLOWS if f != "client_credentials" or _allows_client_credentials(provider)]
    flow = draw(st.sampled_from(flows))
    username = draw(st.none() | non_blank) if flow == "client_credentials" else draw(non_blank)
    preset_servers = _PRESET_SERVERS.get((provider.preset, provider.cloud), (None, None))
    return Account(
        name=name,
        provider=provider,
        username=username,
        flow=flow,
        scopes=draw(scopes),
        refresh_before=draw(durations),
        min_validity=draw(durations),
        allow_users=draw(principal_lists),
        allow_groups=draw(principal_lists),
        # A preset with its mail servers fills in those it knows when none is given.
        imap_server=draw(servers) or preset_servers[0],
        smtp_server=draw(servers) or preset_servers[1],
        pop3_server=draw(servers) or _PRESET_POP3.get((provider.preset, provider.cloud)),
        pop3_security=draw(st.none() | st.sampled_from(["tls", "starttls"])),
        socketmap_keys=tuple(draw(st.lists(st.sampled_from(["[smtp.example.com]:587", "h"])))),
        imap_security=draw(st.none() | st.sampled_from(["tls", "starttls"])),
        smtp_security=draw(st.none() | st.sampled_from(["tls", "starttls"])),
        tls_ca_file=draw(st.none() | absolute_paths),
        token_file=draw(st.none() | absolute_paths),
        token_file_owner=draw(st.none() | principals),
        token_file_group=draw(st.none() | principals),
        token_file_mode=draw(st.sampled_from([0o600, 0o400, 0o640, 0o440, 0o644])),
        notify_command=draw(
            argv if daemon is not None and daemon.notify_command else st.none() | argv
        ),
        notify_interval=draw(positive_durations),
    )


daemon_settings = st.builds(
    DaemonSettings,
    refresh_interval=positive_durations,
    refresh_before=durations,
    refresh_spread=durations,
    max_concurrent_refreshes=st.integers(1, 1000),
    request_timeout=positive_durations,
    min_validity=durations,
    socket=st.none() | absolute_paths,
    state_dir=st.none() | absolute_paths,
    log_format=st.sampled_from(["auto", "json", "console"]),
    log_level=st.sampled_from(["debug", "info", "warning", "error"]),
    admin_group=st.none() | principals,
    unhealthy_after=positive_durations,
    notify_command=st.none() | argv,
    notify_interval=positive_durations,
)


@st.composite
def st_configs(draw: st.DrawFn) -> Config:
    """A valid configuration: every account uses one of the config's own providers."""
    provider_names = draw(st.lists(names, unique=True, max_size=3))
    providers = [draw(st_providers(name)) for name in provider_names]
    account_names = draw(st.lists(names, unique=True, max_size=4)) if providers else []
    daemon = draw(daemon_settings)
    accounts = [draw(st_accounts(name, providers, daemon)) for name in account_names]
    return Config(
        source=draw(st.sampled_from(["<test>", "/etc/mailoauthd/config.toml"])),
        daemon=daemon,
        providers=MappingProxyType({p.name: p for p in providers}),
        accounts=MappingProxyType({a.name: a for a in accounts}),
    )
