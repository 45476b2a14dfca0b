"""Tests of mailoauthd.config: presets, validation messages, secrets, and the TOML round trip."""

# ruff: noqa: S105  (token_endpoint and token_auth_method hold URLs and names, not passwords)

from __future__ import annotations

import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given
from strategies import st_configs

from mailoauthd.config import (
    Config,
    SecretSource,
    load,
    parse,
    to_mapping,
)
from mailoauthd.config.problems import Invalid
from mailoauthd.config.values import duration
from mailoauthd.errors import ConfigError
from mailoauthd.secret import Secret

SOURCE = "/etc/mailoauthd/config.toml"
EXAMPLE = Path(__file__).resolve().parents[1] / "etc" / "mailoauthd.toml"
MICROSOFT = """
[providers.office365]
preset = "microsoft"
client_id = "cid"
"""
GOOGLE = """
[providers.gmail]
preset = "google"
client_id = "cid"
"""
WORK = """
[accounts.work]
provider = "office365"
username = "alice@contoso.com"
"""
MS_DELEGATED = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/POP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
)


def config(*parts: str, base_dir: Path | None = None) -> Config:
    return parse(
        "\n".join(textwrap.dedent(part) for part in parts), source=SOURCE, base_dir=base_dir
    )


def problems(*parts: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(*parts)
    assert info.value.problems == tuple(info.value.message.splitlines())  # type: ignore[attr-defined]
    return info.value.message.splitlines()


def problem(*parts: str) -> str:
    lines = problems(*parts)
    assert len(lines) == 1, lines
    return lines[0]


class TestPresets:
    def test_microsoft_defaults(self) -> None:
        """The microsoft preset fills in tenant, cloud, endpoints and mail scopes."""
        provider = config(MICROSOFT).providers["office365"]
        base = "https://login.microsoftonline.com/common/oauth2/v2.0"
        assert (provider.tenant, provider.cloud) == ("common", "global")
        assert provider.authorization_endpoint == f"{base}/authorize"
        assert provider.token_endpoint == f"{base}/token"
        assert provider.device_authorization_endpoint == f"{base}/devicecode"
        assert provider.revocation_endpoint is None
        assert provider.issuer is None
        assert provider.scopes == MS_DELEGATED
        assert provider.token_auth_method == "client_secret_post"
        assert dict(provider.authorize_params) == {}

    def test_microsoft_tenant_goes_into_the_endpoints(self) -> None:
        """A tenant replaces 'common' in every Microsoft endpoint."""
        provider = config(MICROSOFT, 'tenant = "contoso.onmicrosoft.com"').providers["office365"]
        assert provider.token_endpoint == (
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        )

    @pytest.mark.parametrize(
        ("cloud", "login", "mail", "app"),
        [
            ("usgov", "login.microsoftonline.us", "outlook.office365.us", "outlook.office365.us"),
            ("china", "login.chinacloudapi.cn", "partner.outlook.cn", "partner.outlook.cn"),
            ("global", "login.microsoftonline.com", "outlook.office.com", "outlook.office365.com"),
        ],
    )
    def test_microsoft_clouds(self, cloud: str, login: str, mail: str, app: str) -> None:
        """A national cloud changes the login host, the mail scopes and the app-only scope."""
        parsed = config(
            MICROSOFT,
            f'cloud = "{cloud}"\ntenant = "contoso.com"\nclient_secret_file = "/s"',
            "[accounts.app]\nprovider = 'office365'\nflow = 'client_credentials'",
        )
        provider = parsed.providers["office365"]
        assert provider.token_endpoint == f"https://{login}/contoso.com/oauth2/v2.0/token"
        assert provider.scopes[0] == f"https://{mail}/IMAP.AccessAsUser.All"
        assert parsed.accounts["app"].scopes == (f"https://{app}/.default",)
        assert parsed.accounts["app"].username is None

    def test_google(self) -> None:
        """The google preset fills in Google's four endpoints and the Gmail scope."""
        provider = config(GOOGLE).providers["gmail"]
        assert provider.authorization_endpoint == "https://accounts.google.com/o/oauth2/v2/auth"
        assert provider.token_endpoint == "https://oauth2.googleapis.com/token"
        assert provider.device_authorization_endpoint == (
            "https://oauth2.googleapis.com/device/code"
        )
        assert provider.revocation_endpoint == "https://oauth2.googleapis.com/revoke"
        assert provider.scopes == ("https://mail.google.com/",)
        assert (provider.tenant, provider.cloud) == (None, None)

    def test_generic_with_a_token_endpoint(self) -> None:
        """A generic provider needs only a token endpoint and has no default scopes."""
        provider = config(
            "[providers.x]\nclient_id = 'c'\ntoken_endpoint = 'https://sso.example.org/token'"
        ).providers["x"]
        assert provider.preset == "generic"
        assert provider.token_endpoint == "https://sso.example.org/token"
        assert provider.authorization_endpoint is None
        assert provider.scopes == ()

    def test_generic_with_an_issuer(self) -> None:
        """An issuer alone is enough for a generic provider: its endpoints are discovered later."""
        provider = config(
            "[providers.x]\nclient_id = 'c'\nissuer = 'https://sso.example.org/realms/mail'"
        ).providers["x"]
        assert provider.issuer == "https://sso.example.org/realms/mail"
        assert provider.token_endpoint is None

    def test_explicit_endpoints_override_a_preset(self) -> None:
        """Explicit endpoints replace the preset's, and plain http is fine to a loopback host."""
        provider = config(
            GOOGLE,
            'token_endpoint = "http://127.0.0.1:8080/token"',
            'authorization_endpoint = "http://[::1]:8080/auth"',
            'revocation_endpoint = "http://localhost/revoke"',
        ).providers["gmail"]
        assert provider.token_endpoint == "http://127.0.0.1:8080/token"
        assert provider.authorization_endpoint == "http://[::1]:8080/auth"
        assert provider.revocation_endpoint == "http://localhost/revoke"
        assert provider.device_authorization_endpoint == (
            "https://oauth2.googleapis.com/device/code"
        )

    def test_scopes_cascade(self) -> None:
        """An account's scopes win over its provider's, which win over the preset's."""
        parsed = config(
            MICROSOFT,
            'scopes = ["offline_access", "openid"]',
            WORK,
            "[accounts.other]\nprovider = 'office365'\nusername = 'b@c'\nscopes = []",
        )
        assert parsed.providers["office365"].scopes == ("offline_access", "openid")
        assert parsed.accounts["work"].scopes == ("offline_access", "openid")
        assert parsed.accounts["other"].scopes == ()

    def test_account_settings(self) -> None:
        """Accounts resolve their provider and take durations from [daemon] unless they set them."""
        parsed = config(
            "[daemon]\nrefresh_before = '20m'\nmin_validity = '2m'",
            MICROSOFT,
            WORK,
            "[accounts.other]\nprovider = 'office365'\nusername = 'b@c'\nflow = 'device_code'",
            "refresh_before = '1h'\nmin_validity = 0",
        )
        work, other = parsed.accounts["work"], parsed.accounts["other"]
        assert work.provider is parsed.providers["office365"]
        assert (work.flow, work.username) == ("authorization_code", "alice@contoso.com")
        assert (work.refresh_before, work.min_validity) == (
            timedelta(minutes=20),
            timedelta(minutes=2),
        )
        assert other.flow == "device_code"
        assert (other.refresh_before, other.min_validity) == (timedelta(hours=1), timedelta(0))

    def test_authorize_params(self) -> None:
        """Extra authorize parameters are kept as given."""
        parsed = config(
            MICROSOFT, 'authorize_params = { prompt = "consent", domain_hint = "c.com" }'
        )
        assert dict(parsed.providers["office365"].authorize_params) == {
            "prompt": "consent",
            "domain_hint": "c.com",
        }

    def test_file_order_is_kept(self) -> None:
        """Providers and accounts keep the order of the file."""
        parsed = config(GOOGLE, MICROSOFT, WORK, "[accounts.a]\nprovider = 'gmail'\nusername = 'x'")
        assert list(parsed.providers) == ["gmail", "office365"]
        assert list(parsed.accounts) == ["work", "a"]


class TestDaemonSettings:
    def test_defaults(self) -> None:
        """An empty file is a valid, warning-free daemon with the documented defaults."""
        parsed = config("")
        assert parsed.daemon.refresh_interval == timedelta(minutes=3)
        assert parsed.daemon.refresh_before == timedelta(minutes=10)
        assert parsed.daemon.refresh_spread == timedelta(seconds=30)
        assert parsed.daemon.max_concurrent_refreshes == 8
        assert parsed.daemon.request_timeout == timedelta(seconds=30)
        assert parsed.daemon.min_validity == timedelta(seconds=60)
        assert (parsed.daemon.socket, parsed.daemon.state_dir) == (None, None)
        assert (parsed.daemon.log_format, parsed.daemon.log_level) == ("auto", "info")
        assert (dict(parsed.providers), dict(parsed.accounts), parsed.warnings) == ({}, {}, ())

    def test_every_key(self) -> None:
        """Every [daemon] key is read into DaemonSettings."""
        daemon = config(
            """
            [daemon]
            refresh_interval = "1m"
            refresh_before = 300
            refresh_spread = "0s"
            max_concurrent_refreshes = 2
            request_timeout = 2.5
            min_validity = "90s"
            socket = "/run/m/socket"
            state_dir = "/var/lib/m"
            log_format = "json"
            log_level = "debug"
            """
        ).daemon
        assert daemon.refresh_interval == timedelta(minutes=1)
        assert daemon.refresh_before == timedelta(minutes=5)
        assert daemon.refresh_spread == timedelta(0)
        assert daemon.max_concurrent_refreshes == 2
        assert daemon.request_timeout == timedelta(seconds=2.5)
        assert daemon.min_validity == timedelta(seconds=90)
        assert (daemon.socket, daemon.state_dir) == (Path("/run/m/socket"), Path("/var/lib/m"))
        assert (daemon.log_format, daemon.log_level) == ("json", "debug")


class TestDurations:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("90s", timedelta(seconds=90)),
            ("3m", timedelta(minutes=3)),
            ("1h", timedelta(hours=1)),
            ("2d", timedelta(days=2)),
            ("1h30m", timedelta(hours=1, minutes=30)),
            ("1d 2h 3m 4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
            ("0s", timedelta(0)),
            (45, timedelta(seconds=45)),
            (0.5, timedelta(milliseconds=500)),
        ],
    )
    def test_accepted(self, value: object, expected: timedelta) -> None:
        """Unit strings, their combinations and plain numbers of seconds are durations."""
        assert duration(value) == expected

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            ("1.5h", "(got '1.5h', a str)"),
            ("90", "(got '90', a str); add a unit, e.g. '90s'"),
            ("", "(got '', a str)"),
            ("3m1h", "(got '3m1h', a str)"),
            (-1, "(got -1, an int)"),
            (True, "(got true, a bool)"),
            (float("nan"), "(got nan, a float)"),
            (float("inf"), "(got inf, a float)"),
            ([1], "(got [1], a list)"),
        ],
    )
    def test_refused(self, value: object, shown: str) -> None:
        """Anything else is refused with the accepted forms and what was found."""
        with pytest.raises(Invalid) as info:
            duration(value)
        assert str(info.value) == (
            'must be a duration such as "90s", "3m", "1h30m" or "2d",'
            f" or a number of seconds {shown}"
        )

    def test_too_long(self) -> None:
        """A duration timedelta cannot hold is refused, not crashed on."""
        with pytest.raises(Invalid, match=r"^is too long a duration"):
            duration("99999999999d")

    def test_in_a_table(self) -> None:
        """A bad duration in the file names the file, the table and the key."""
        assert problem("[daemon]\nrefresh_before = '10 minutes'").startswith(
            f"{SOURCE}: [daemon] refresh_before: must be a duration such as"
        )


class TestErrors:
    def test_unknown_key_suggests_the_right_one(self) -> None:
        """A misspelt key is named with the closest known key."""
        assert problem(MICROSOFT, WORK, 'refresh_margin = "5m"') == (
            f"{SOURCE}: [accounts.work] refresh_margin: unknown key; did you mean 'refresh_before'?"
        )

    def test_unknown_key_without_a_close_match_lists_the_keys(self) -> None:
        """An unknown key with no close match lists what the table accepts."""
        assert problem("[daemon]\nzzz = 1") == (
            f"{SOURCE}: [daemon] zzz: unknown key; expected one of: refresh_interval, "
            "refresh_before, refresh_spread, max_concurrent_refreshes, request_timeout, "
            "min_validity, socket, state_dir, log_format, log_level, admin_group, unhealthy_after, "
            "notify_command, notify_interval"
        )

    def test_key_in_the_wrong_table(self) -> None:
        """A key that belongs in another table says which one."""
        assert problem(MICROSOFT, WORK, 'client_id = "x"') == (
            f"{SOURCE}: [accounts.work] client_id: unknown key here; "
            "it belongs in [providers.office365]"
        )
        assert problem('refresh_interval = "3m"') == (
            f"{SOURCE}: refresh_interval: unknown key here; it belongs in [daemon]"
        )

    def test_key_named_as_another_tool_names_it(self) -> None:
        """A key named as pizauth or Google name it gets our name."""
        assert problem(MICROSOFT, 'token_uri = "https://x.example/token"') == (
            f"{SOURCE}: [providers.office365] token_uri: unknown key; "
            "mailoauthd calls this 'token_endpoint'"
        )

    def test_wrong_type(self) -> None:
        """A value of the wrong type is shown with its type."""
        assert problem(MICROSOFT, WORK, 'scopes = "offline_access"') == (
            f"{SOURCE}: [accounts.work] scopes: must be a list of strings "
            "(got 'offline_access', a str)"
        )
        assert problem(MICROSOFT, WORK, 'scopes = ["a", 3]') == (
            f"{SOURCE}: [accounts.work] scopes: must be a list of strings (item 2 is 3, an int)"
        )

    def test_bool_is_not_a_number(self) -> None:
        """true is not 1."""
        assert problem("[daemon]\nmax_concurrent_refreshes = true") == (
            f"{SOURCE}: [daemon] max_concurrent_refreshes: must be a whole number of at least 1 "
            "(got true, a bool)"
        )

    def test_at_least_one_concurrent_refresh(self) -> None:
        """max_concurrent_refreshes must be at least 1."""
        assert problem("[daemon]\nmax_concurrent_refreshes = 0").endswith("(got 0, an int)")

    def test_refresh_interval_is_not_zero(self) -> None:
        """A zero refresh_interval would spin; it is refused."""
        assert problem("[daemon]\nrefresh_interval = '0s'") == (
            f"{SOURCE}: [daemon] refresh_interval: must be longer than zero (got '0s', a str)"
        )

    def test_empty_string(self) -> None:
        """An empty client_id is refused."""
        assert problem(MICROSOFT.replace('"cid"', '""')) == (
            f"{SOURCE}: [providers.office365] client_id: must be a non-empty string (got '', a str)"
        )

    def test_missing_required_key(self) -> None:
        """A missing key says what to write there."""
        assert problem("[providers.x]\ntoken_endpoint = 'https://a.example/t'") == (
            f"{SOURCE}: [providers.x] client_id: required key is missing; "
            "expected the client (application) ID of the app registration"
        )

    def test_missing_provider_lists_the_defined_ones(self) -> None:
        """An account without a provider lists the providers it could use."""
        assert problem(MICROSOFT, GOOGLE, "[accounts.work]\nusername = 'a@b'") == (
            f"{SOURCE}: [accounts.work] provider: required key is missing; expected the name "
            "of a [providers.NAME] table (defined: office365, gmail)"
        )

    def test_unknown_provider(self) -> None:
        """A reference to an undefined provider suggests the closest one."""
        assert problem(MICROSOFT, WORK.replace('"office365"', '"offce365"')) == (
            f"{SOURCE}: [accounts.work] provider: there is no [providers.offce365] table; "
            "did you mean 'office365'? (defined: office365)"
        )

    def test_missing_username(self) -> None:
        """Accounts that sign a person in need a username."""
        assert problem(MICROSOFT, "[accounts.work]\nprovider = 'office365'") == (
            f"{SOURCE}: [accounts.work] username: required key is missing; expected the mailbox "
            "address, e.g. 'alice@example.com' (the SASL user and login hint)"
        )

    def test_bad_enum_lists_the_allowed_values(self) -> None:
        """A bad choice lists the allowed values and the closest one."""
        assert problem(MICROSOFT, WORK, 'flow = "device"') == (
            f"{SOURCE}: [accounts.work] flow: must be one of 'authorization_code', "
            "'device_code', 'client_credentials' (got 'device', a str); did you mean 'device_code'?"
        )

    def test_unknown_table(self) -> None:
        """A misspelt top-level table suggests the right one."""
        assert problem("[acounts.work]\nprovider = 'x'") == (
            f"{SOURCE}: [acounts]: unknown table; did you mean 'accounts'?"
        )

    def test_not_toml(self) -> None:
        """A syntax error gives tomllib's line and column."""
        line = problem("[daemon]\nrefresh_interval = 3m\n")
        assert line.startswith(f"{SOURCE}: not valid TOML: ")
        assert line.endswith("(at line 2, column 21)")

    @pytest.mark.parametrize("name", ["my work", "-work", "wörk", "a" * 65, "a/b"])
    def test_bad_names(self, name: str) -> None:
        """Account and provider names must be safe as file names and shell words."""
        rule = (
            "a name must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit; it becomes a file name"
        )
        lines = problems(f'[providers."{name}"]\nclient_id = "c"\nissuer = "https://a.example"')
        assert lines == [f"{SOURCE}: [providers] {name!r}: {rule}"]
        lines = problems(MICROSOFT, f'[accounts."{name}"]\nprovider = "office365"\nusername = "u"')
        assert lines == [f"{SOURCE}: [accounts] {name!r}: {rule}"]

    def test_client_credentials_needs_a_secret(self) -> None:
        """client_credentials without a client secret names the provider to fix."""
        text = (MICROSOFT, 'tenant = "contoso.com"', "[accounts.app]\nprovider = 'office365'")
        assert problem(*text, "flow = 'client_credentials'") == (
            f"{SOURCE}: [accounts.app] flow: client_credentials needs a client secret; "
            "[providers.office365] has none; set client_secret_file or client_secret_command there"
        )

    def test_client_credentials_needs_a_directory(self) -> None:
        """client_credentials at Microsoft's shared tenants cannot work and is refused."""
        text = (MICROSOFT, 'client_secret_file = "/s"', "[accounts.app]\nprovider = 'office365'")
        assert problem(*text, "flow = 'client_credentials'") == (
            f"{SOURCE}: [accounts.app] flow: client_credentials needs a directory, not 'common'; "
            "set tenant in [providers.office365] to your directory's domain or ID"
        )

    def test_client_credentials_with_an_explicit_endpoint_and_no_tenant(self) -> None:
        """An explicit token endpoint (a test double) lifts the tenant check."""
        parsed = config(
            MICROSOFT,
            'client_secret_file = "/s"\ntoken_endpoint = "http://127.0.0.1:9/token"',
            "[accounts.app]\nprovider = 'office365'\nflow = 'client_credentials'",
        )
        assert parsed.accounts["app"].flow == "client_credentials"

    def test_google_has_no_client_credentials(self) -> None:
        """Gmail offers no client_credentials grant."""
        text = (GOOGLE, 'client_secret_file = "/s"', "[accounts.g]\nprovider = 'gmail'")
        assert problem(*text, "flow = 'client_credentials'") == (
            f"{SOURCE}: [accounts.g] flow: Google offers no client_credentials grant for Gmail"
        )

    def test_tenant_and_cloud_are_microsoft_only(self) -> None:
        """tenant and cloud on another preset are refused."""
        assert problems(GOOGLE, 'tenant = "contoso.com"', 'cloud = "china"') == [
            f"{SOURCE}: [providers.gmail] tenant: only the 'microsoft' preset has one; "
            "this one is 'google'",
            f"{SOURCE}: [providers.gmail] cloud: only the 'microsoft' preset has one; "
            "this one is 'google'",
        ]

    def test_bad_tenant(self) -> None:
        """A tenant must be a shared one, a GUID or a domain."""
        assert "tenant: must be 'common', 'organizations', 'consumers', a directory ID" in problem(
            MICROSOFT, 'tenant = "contoso com"'
        )

    def test_one_secret_source(self) -> None:
        """At most one of the three client secret keys may be set."""
        assert problem(MICROSOFT, 'client_secret_file = "/s"\nclient_secret_command = ["p"]') == (
            f"{SOURCE}: [providers.office365] client_secret_command: set only one of "
            "client_secret_file, client_secret_command"
        )

    def test_secret_command_is_an_argv_list(self) -> None:
        """A shell string for client_secret_command is refused with an example."""
        assert problem(MICROSOFT, 'client_secret_command = "pass show x"') == (
            f"{SOURCE}: [providers.office365] client_secret_command: must be a list of strings, "
            "not a shell command: program and arguments, e.g. "
            "['pass', 'show', 'mail/client-secret']"
        )

    def test_tilde_is_not_expanded(self) -> None:
        """A secret file under '~' is refused rather than silently looked up elsewhere."""
        assert "'~' is not expanded" in problem(MICROSOFT, 'client_secret_file = "~/s"')

    @pytest.mark.parametrize("key", ["socket", "state_dir"])
    def test_relative_paths(self, key: str) -> None:
        """socket and state_dir must be absolute."""
        assert problem(f'[daemon]\n{key} = "run/x"') == (
            f"{SOURCE}: [daemon] {key}: must be an absolute path (got 'run/x', a str); "
            "a relative one would depend on where the daemon starts"
        )

    def test_socket_path_length(self) -> None:
        """A socket path longer than sun_path allows is refused."""
        path = "/" + "s" * 120
        assert problem(f'[daemon]\nsocket = "{path}"') == (
            f"{SOURCE}: [daemon] socket: is 121 bytes long; socket paths may have 107"
        )

    @pytest.mark.parametrize(
        "url", ["http://example.com/t", "http://127.0.0.2/t", "ftp://a.example", "https://", "x"]
    )
    def test_endpoints_must_be_https(self, url: str) -> None:
        """Endpoints must be https, except plain http to a loopback host."""
        assert "token_endpoint: must " in problem(GOOGLE, f'token_endpoint = "{url}"')

    def test_plain_http_says_where_it_is_allowed(self) -> None:
        """Plain http to a remote host says that only loopback hosts may use it."""
        assert problem(GOOGLE, 'token_endpoint = "http://example.com/t"') == (
            f"{SOURCE}: [providers.gmail] token_endpoint: must use https "
            "(got 'http://example.com/t', a str); plain http is allowed only to 127.0.0.1, "
            "[::1] or localhost"
        )

    @pytest.mark.parametrize("name", ["scope", "redirect_uri", "state", "code_challenge", "nonce"])
    def test_reserved_authorize_params(self, name: str) -> None:
        """Parameters mailoauthd sets itself cannot be set in authorize_params."""
        assert problem(MICROSOFT, f'authorize_params = {{ {name} = "x" }}') == (
            f"{SOURCE}: [providers.office365] authorize_params: '{name}' is set by mailoauthd "
            "itself (from client_id, scopes and the flow); remove it"
        )

    def test_generic_needs_endpoints(self) -> None:
        """A generic provider without token_endpoint or issuer says which keys to set."""
        assert problem("[providers.x]\nclient_id = 'c'") == (
            f"{SOURCE}: [providers.x] token_endpoint: required key is missing; a generic provider "
            "needs token_endpoint (and authorization_endpoint or device_authorization_endpoint "
            "to sign in), or issuer to discover them"
        )

    def test_issuer_is_for_generic_only(self) -> None:
        """An issuer on a preset is refused: the preset knows its endpoints."""
        assert "issuer: is for discovery with preset 'generic' only" in problem(
            GOOGLE, 'issuer = "https://accounts.google.com"'
        )

    def test_not_a_table(self) -> None:
        """A top-level table written as a value is refused."""
        assert problem('daemon = "x"') == f"{SOURCE}: [daemon]: must be a table (got a str)"

    def test_every_problem_at_once(self) -> None:
        """All problems are reported together, one a line, unknown tables first."""
        lines = problems(
            "[daemon]\nlog_level = 'loud'\nrefresh_interval = 0",
            MICROSOFT,
            "tenant = 1",
            "[accounts.work]\nprovider = 'nope'",
            "[acounts.x]",
        )
        assert lines[0] == f"{SOURCE}: [acounts]: unknown table; did you mean 'accounts'?"
        assert [line.split(": ")[1] for line in lines[1:]] == [
            "[daemon] log_level",
            "[daemon] refresh_interval",
            "[providers.office365] tenant",
            "[accounts.work] provider",
            "[accounts.work] username",
        ]

    def test_no_cascade_from_a_broken_provider(self) -> None:
        """An account of a provider with problems does not repeat them."""
        assert problems(MICROSOFT, "cloud = 'mars'", WORK) == [
            f"{SOURCE}: [providers.office365] cloud: must be one of 'global', 'usgov', 'china' "
            "(got 'mars', a str)"
        ]


class TestSecrecy:
    def test_repr_and_str_hide_an_inline_secret(self) -> None:
        """Neither repr nor str of a Config shows an inline client secret."""
        parsed = config(MICROSOFT, 'client_secret = "hunter2-very-secret"', WORK)
        for text in (
            repr(parsed),
            str(parsed),
            repr(parsed.accounts["work"]),
            str(parsed.warnings),
        ):
            assert "hunter2" not in text
        assert parsed.providers["office365"].client_secret == SecretSource(
            inline=Secret("hunter2-very-secret")
        )

    def test_inline_secret_warns(self) -> None:
        """An inline secret is allowed with a warning that names the key but not the value."""
        parsed = config(MICROSOFT, 'client_secret = "hunter2"')
        assert parsed.warnings == (
            f"{SOURCE}: [providers.office365] client_secret: is inline in the config file; "
            "prefer client_secret_file or client_secret_command",
        )

    def test_errors_do_not_echo_secrets(self) -> None:
        """A mistyped or misplaced secret appears in no error message."""
        assert problem(MICROSOFT, "client_secret = 123456789") == (
            f"{SOURCE}: [providers.office365] client_secret: must be a non-empty string "
            "(got an int)"
        )
        line = problem('[providers]\nclient_secret = "hunter2"')
        assert "hunter2" not in line
        assert line.startswith(f"{SOURCE}: [providers] client_secret: must be a table")

    def test_min_validity_not_below_refresh_before_warns(self) -> None:
        """Tokens that stop being handed out before they are refreshed earn a warning."""
        parsed = config(MICROSOFT, WORK, "min_validity = '10m'")
        assert parsed.warnings == (
            f"{SOURCE}: [accounts.work] min_validity: is not shorter than refresh_before: "
            "mail programs would wait for refreshes; make refresh_before longer",
        )


class TestSecretSource:
    def test_relative_file_is_relative_to_the_config(self, tmp_path: Path) -> None:
        """A relative client_secret_file is resolved against the config's directory."""
        (tmp_path / "o365.secret").write_text("s3cret\n")
        parsed = config(MICROSOFT, 'client_secret_file = "o365.secret"', base_dir=tmp_path)
        source = parsed.providers["office365"].client_secret
        assert source == SecretSource(file=tmp_path / "o365.secret")
        assert source.key == "client_secret_file"
        assert source.read(where="w") == Secret("s3cret")

    def test_default_base_dir_is_the_source_directory(self) -> None:
        """Without base_dir, relative paths are relative to the directory of `source`."""
        parsed = config(MICROSOFT, 'client_secret_file = "o365.secret"')
        assert parsed.providers["office365"].client_secret == SecretSource(
            file=Path("/etc/mailoauthd/o365.secret")
        )

    def test_variables_are_expanded_when_read(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """${VAR} and $VAR in the path come from the environment when the secret is read."""
        (tmp_path / "office365").write_text("  from-systemd \n\n")
        parsed = config(MICROSOFT, 'client_secret_file = "${CREDENTIALS_DIRECTORY}/office365"')
        source = parsed.providers["office365"].client_secret
        assert source == SecretSource(file=Path("${CREDENTIALS_DIRECTORY}/office365"))
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        assert source.read(where="w") == Secret("from-systemd")
        other = SecretSource(file=Path("$DIR/office365"))
        assert other.read(where="w", env={"DIR": str(tmp_path)}) == Secret("from-systemd")

    def test_unset_variable(self) -> None:
        """An unset variable is named, with a hint for systemd credentials."""
        source = SecretSource(file=Path("${CREDENTIALS_DIRECTORY}/office365"))
        with pytest.raises(ConfigError) as info:
            source.read(where="providers.o.client_secret_file", env={})
        assert info.value.message == (
            "providers.o.client_secret_file: ${CREDENTIALS_DIRECTORY}/office365 needs "
            "$CREDENTIALS_DIRECTORY, which is not set; systemd sets it for the service's "
            "LoadCredential= (to check the configuration outside the service: "
            "'mailoauthd check-config --credentials-directory DIR')"
        )

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is named with the OS error."""
        with pytest.raises(ConfigError) as info:
            SecretSource(file=tmp_path / "nope").read(where="providers.o.client_secret_file")
        assert info.value.message == (
            f"providers.o.client_secret_file: cannot read {tmp_path / 'nope'}: "
            "No such file or directory"
        )

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty secret file is an error, not an empty secret."""
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ConfigError) as info:
            SecretSource(file=tmp_path / "empty").read(where="w")
        assert info.value.message == f"w: {tmp_path / 'empty'} is empty"

    @pytest.mark.integration  # ,  # client_secret_command
    def test_command(self) -> None:
        """A command's stdout, stripped, is the secret."""
        source = SecretSource(command=(sys.executable, "-c", "print(' s3cret ')"))
        assert source.key == "client_secret_command"
        assert source.read(where="w") == Secret("s3cret")

    @pytest.mark.integration  # ,
    def test_failing_command_shows_no_output(self) -> None:
        """A failing command is reported by program and status, never by its output."""
        code = "import sys; print('leaked-secret'); sys.stderr.write('leaked-err'); sys.exit(3)"
        with pytest.raises(ConfigError) as info:
            SecretSource(command=(sys.executable, "-c", code)).read(where="p.client_secret_command")
        message = str(info.value)
        assert "leaked" not in message
        assert info.value.message == (
            f"p.client_secret_command: {sys.executable!r} exited with status 3; "
            "run it yourself to see why"
        )
        assert info.value.__cause__ is None

    @pytest.mark.integration  # ,
    def test_missing_program(self, tmp_path: Path) -> None:
        """A program that does not exist is named with the OS error."""
        with pytest.raises(ConfigError) as info:
            SecretSource(command=(str(tmp_path / "nope"),)).read(where="w")
        assert info.value.message == (
            f"w: {str(tmp_path / 'nope')!r} cannot be run: No such file or directory"
        )

    @pytest.mark.integration  # ,
    def test_silent_command(self) -> None:
        """A command that prints nothing is an error."""
        with pytest.raises(ConfigError, match="printed nothing on stdout"):
            SecretSource(command=(sys.executable, "-c", "pass")).read(where="w")

    def test_inline(self) -> None:
        """An inline secret is returned as is."""
        assert SecretSource(inline=Secret("x")).read(where="w") == Secret("x")

    def test_exactly_one_source(self) -> None:
        """A SecretSource with no source, or two, cannot be built."""
        with pytest.raises(ValueError, match="exactly one"):
            SecretSource()
        with pytest.raises(ValueError, match="exactly one"):
            SecretSource(inline=Secret("x"), command=("a",))


class TestLoad:
    def test_example_file(self) -> None:
        """The shipped example parses without warnings and covers every preset and flow."""
        loaded = load(EXAMPLE)
        assert loaded.warnings == ()
        assert {p.preset for p in loaded.providers.values()} == {"microsoft", "google", "generic"}
        assert {a.flow for a in loaded.accounts.values()} == {
            "authorization_code",
            "device_code",
            "client_credentials",
        }
        assert parse(tomli_w.dumps(to_mapping(loaded)), source=loaded.source) == loaded

    def test_relative_secret_next_to_the_file(self, tmp_path: Path) -> None:
        """load() resolves relative secret paths against the file's own directory."""
        (tmp_path / "config.toml").write_text(
            textwrap.dedent(MICROSOFT) + 'client_secret_file = "s"'
        )
        loaded = load(tmp_path / "config.toml")
        assert loaded.source == str(tmp_path / "config.toml")
        assert loaded.providers["office365"].client_secret == SecretSource(file=tmp_path / "s")

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is named, with the OS error and what to do."""
        with pytest.raises(ConfigError) as info:
            load(tmp_path / "config.toml")
        assert info.value.message == (
            f"{tmp_path / 'config.toml'}: cannot read the configuration: No such file or directory"
        )
        assert "--config" in info.value.hint

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is refused with the file's name."""
        (tmp_path / "config.toml").write_bytes(b"[daemon]\n# \xff\n")
        with pytest.raises(ConfigError, match="cannot read the configuration: not UTF-8 text"):
            load(tmp_path / "config.toml")


class TestRoundTrip:
    @pytest.mark.slow
    @given(st_configs())
    def test_config_round_trips(self, original: Config) -> None:
        """Any valid config survives to_mapping, TOML and parse unchanged."""
        text = tomli_w.dumps(to_mapping(original))
        assert parse(text, source=original.source) == original

    def test_to_mapping_writes_explicit_values(self) -> None:
        """to_mapping writes a preset's endpoints, tenant and scopes out explicitly."""
        written = to_mapping(config(MICROSOFT, WORK))
        provider = written["providers"]["office365"]
        assert provider["tenant"] == "common"
        assert provider["token_endpoint"].endswith("/common/oauth2/v2.0/token")
        assert provider["scopes"] == list(MS_DELEGATED)
        assert written["accounts"]["work"]["provider"] == "office365"
        assert written["daemon"]["refresh_interval"] == "3m"

    def test_warnings_do_not_affect_equality(self) -> None:
        """Warnings are advice: configs differing only in warnings are equal."""
        parsed = config(MICROSOFT, 'client_secret = "x"')
        assert parsed.warnings
        assert parse(tomli_w.dumps(to_mapping(parsed)), source=SOURCE) == parsed


class TestAccessKeys:
    def test_defaults(self) -> None:
        """Without access keys an account has empty allow lists, and there is no admin group."""
        parsed = config(MICROSOFT, WORK)
        assert parsed.accounts["work"].allow_users == ()
        assert parsed.accounts["work"].allow_groups == ()
        assert parsed.daemon.admin_group is None
        assert parsed.daemon.unhealthy_after == timedelta(minutes=15)

    def test_names_and_ids(self) -> None:
        """Names stay names; ints and strings of digits become numeric ids."""
        parsed = config(
            """
            [daemon]
            admin_group = "mailadm"
            unhealthy_after = "1h"
            """,
            MICROSOFT,
            WORK,
            """
            allow_users = ["alice", 1001, "1002", "bob@corp.example"]
            allow_groups = ["mail-users", 100]
            """,
        )
        work = parsed.accounts["work"]
        assert work.allow_users == ("alice", 1001, 1002, "bob@corp.example")
        assert work.allow_groups == ("mail-users", 100)
        assert parsed.daemon.admin_group == "mailadm"
        assert parsed.daemon.unhealthy_after == timedelta(hours=1)
        assert config("[daemon]\nadmin_group = 4").daemon.admin_group == 4

    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            ('"alice"', "must be a list of names or numeric ids"),
            ("[true]", "item 1 must be a user or group name, or a numeric id (got true, a bool)"),
            ('["al ice"]', "item 1 must be a user or group name"),
            ('["a:b"]', "item 1 must be a user or group name"),
            ('[""]', "item 1 must be a user or group name"),
            ("[-1]", "item 1 must be a user or group name, or a numeric id (got -1, an int)"),
            ("[4294967295]", "item 1 must be a user or group name"),
            ('["alice", "alice"]', "'alice' is listed twice"),
            ('[7, "7"]', "'7' is listed twice"),
        ],
    )
    def test_bad_allow_lists(self, value: str, shown: str) -> None:
        """A bad allow list names the file, the table, the key and the offending item."""
        found = problems(MICROSOFT, WORK, f"allow_users = {value}")
        assert len(found) == 1
        assert found[0].startswith(f"{SOURCE}: [accounts.work] allow_users: {shown}")

    def test_bad_daemon_keys(self) -> None:
        """admin_group takes one name or id; unhealthy_after a positive duration."""
        assert problems('[daemon]\nadmin_group = ["a"]') == [
            f"{SOURCE}: [daemon] admin_group: must be a user or group name, or a numeric id "
            "(got ['a'], a list)"
        ]
        assert problems('[daemon]\nunhealthy_after = "0s"') == [
            f"{SOURCE}: [daemon] unhealthy_after: must be longer than zero (got '0s', a str)"
        ]

    def test_allow_lists_are_account_keys(self) -> None:
        """allow_users under [daemon] is refused with a pointer to the account table."""
        assert problems("[daemon]\nallow_users = []") == [
            f"{SOURCE}: [daemon] allow_users: unknown key here; "
            "it belongs in an [accounts.NAME] table"
        ]


class TestMailSettings:
    def test_presets_know_their_mail_servers(self) -> None:
        """Microsoft and Google accounts log in to their providers' IMAP and SMTP servers."""
        parsed = config(
            MICROSOFT, GOOGLE, WORK, "[accounts.home]\nprovider = 'gmail'\nusername = 'a@b'"
        )
        work, home = parsed.accounts["work"], parsed.accounts["home"]
        assert (work.imap_server, work.smtp_server) == (
            "outlook.office365.com:993",
            "smtp.office365.com:587",
        )
        assert (home.imap_server, home.smtp_server) == ("imap.gmail.com:993", "smtp.gmail.com:587")

    def test_account_servers_override_the_preset(self) -> None:
        """imap_server, smtp_server, their security and tls_ca_file are taken as given."""
        work = config(
            MICROSOFT,
            WORK,
            'imap_server = "[::1]:1143"\nimap_security = "none"\n'
            'smtp_server = "mail.example.com:465"\nsmtp_security = "tls"\n'
            'tls_ca_file = "/etc/ssl/private-ca.pem"',
        ).accounts["work"]
        assert (work.imap_server, work.imap_security) == ("[::1]:1143", "none")
        assert (work.smtp_server, work.smtp_security) == ("mail.example.com:465", "tls")
        assert work.tls_ca_file == Path("/etc/ssl/private-ca.pem")

    def test_token_file(self) -> None:
        """token_file takes an owner, a group and a mode; the mode defaults to 0600."""
        work = config(MICROSOFT, WORK, 'token_file = "/run/tok"').accounts["work"]
        assert (work.token_file, work.token_file_mode) == (Path("/run/tok"), 0o600)
        work = config(
            MICROSOFT,
            WORK,
            'token_file = "/run/tok"\ntoken_file_owner = "fetchmail"\n'
            'token_file_group = 8\ntoken_file_mode = "0440"',
        ).accounts["work"]
        assert (work.token_file_owner, work.token_file_group) == ("fetchmail", 8)
        assert work.token_file_mode == 0o440
        assert config(MICROSOFT, WORK, "token_file_mode = 0o640").accounts[
            "work"
        ].token_file_mode == (0o640)

    @pytest.mark.parametrize(
        ("line", "shown"),
        [
            ('imap_server = "outlook.office365.com"', "imap_server: must be 'host:port'"),
            ('smtp_server = "smtp.example.com:0"', "smtp_server: has no valid port number"),
            ('imap_security = "ssl"', "imap_security: must be one of 'tls', 'starttls', 'none'"),
            (
                'smtp_security = "none"',
                "smtp_security: is 'none' for smtp.office365.com; a token in the clear",
            ),
            ('token_file = "tok"', "token_file: must be an absolute path"),
            ('token_file_mode = "0666"', "token_file_mode: lets others than the owner write"),
            ("token_file_mode = 0o200", "token_file_mode: lets the owner write but not read"),
            ('token_file_mode = "rw"', "token_file_mode: must be permission bits"),
            ('token_file_owner = "a b"', "token_file_owner: must be a user or group name"),
        ],
    )
    def test_bad_mail_settings(self, line: str, shown: str) -> None:
        """A bad server, security mode or token file setting is named with what is expected."""
        assert problem(MICROSOFT, WORK, line).startswith(f"{SOURCE}: [accounts.work] {shown}")

    def test_plain_text_to_loopback(self) -> None:
        """Security 'none' is allowed for a test server on this machine."""
        work = config(
            MICROSOFT, WORK, 'smtp_server = "127.0.0.1:2525"\nsmtp_security = "none"'
        ).accounts["work"]
        assert work.smtp_security == "none"


class TestSignInAndReminderKeys:
    def test_defaults(self) -> None:
        """No fixed redirect port, no command, reminders every 6 h, Microsoft's 90 idle days."""
        cfg = config(MICROSOFT, WORK)
        provider, work = cfg.providers["office365"], cfg.accounts["work"]
        assert provider.redirect_port is None
        assert provider.testing is False
        assert provider.refresh_token_max_age is None
        assert provider.refresh_token_max_idle == timedelta(days=90)
        assert cfg.daemon.notify_command is None
        assert (work.notify_command, work.notify_interval) == (None, timedelta(hours=6))

    def test_every_key(self) -> None:
        """Each key is read; an account inherits the command and interval unless it sets them."""
        cfg = config(
            """
            [daemon]
            notify_command = ["notify-send", "mailoauthd"]
            notify_interval = "2h"
            """,
            GOOGLE,
            """
            redirect_port = 8765
            testing = true
            refresh_token_max_idle = "30d"
            [accounts.me]
            provider = "gmail"
            username = "me@gmail.com"
            [accounts.other]
            provider = "gmail"
            username = "other@gmail.com"
            notify_command = ["mail", "-s", "sign in", "root"]
            notify_interval = "1d"
            """,
        )
        gmail = cfg.providers["gmail"]
        assert gmail.redirect_port == 8765
        assert gmail.testing is True
        assert gmail.refresh_token_max_age == timedelta(days=7)  # what testing implies
        assert gmail.refresh_token_max_idle == timedelta(days=30)
        me, other = cfg.accounts["me"], cfg.accounts["other"]
        assert (me.notify_command, me.notify_interval) == (
            ("notify-send", "mailoauthd"),
            timedelta(hours=2),
        )
        assert other.notify_command == ("mail", "-s", "sign in", "root")
        assert other.notify_interval == timedelta(days=1)

    def test_explicit_age_beats_testing(self) -> None:
        """A refresh_token_max_age of one's own replaces the 7 days of testing."""
        cfg = config(GOOGLE, 'testing = true\nrefresh_token_max_age = "3d"')
        assert cfg.providers["gmail"].refresh_token_max_age == timedelta(days=3)

    @pytest.mark.parametrize(
        ("parts", "shown"),
        [
            (
                (MICROSOFT, "redirect_port = 0"),
                "[providers.office365] redirect_port: must be a TCP port number from 1 to 65535 "
                "(got 0, an int)",
            ),
            (
                (MICROSOFT, 'redirect_port = "8080"'),
                "[providers.office365] redirect_port: must be a TCP port number",
            ),
            (
                (MICROSOFT, "testing = true"),
                "[providers.office365] testing: only the 'google' preset has it",
            ),
            ((GOOGLE, 'testing = "yes"'), "[providers.gmail] testing: must be true or false"),
            (
                (MICROSOFT, 'refresh_token_max_idle = "0s"'),
                "[providers.office365] refresh_token_max_idle: must be longer than zero",
            ),
            (
                ('[daemon]\nnotify_command = "notify-send hi"',),
                "[daemon] notify_command: must be a list of strings, not a shell command",
            ),
            (
                (MICROSOFT, WORK, "notify_interval = 0"),
                "[accounts.work] notify_interval: must be longer than zero",
            ),
        ],
    )
    def test_mistakes(self, parts: tuple[str, ...], shown: str) -> None:
        """Each mistake names the table and key and says what is expected."""
        assert problem(*parts).startswith(f"{SOURCE}: {shown}")

    def test_testing_false_is_allowed_anywhere(self) -> None:
        """testing = false changes nothing, whatever the preset."""
        assert config(MICROSOFT, "testing = false").providers["office365"].testing is False
