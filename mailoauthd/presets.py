"""
Every provider fact mailoauthd knows, as frozen data: one `Preset` entry per provider.

A preset names its endpoints, default scopes, mail servers, the extra parameters its
sign-in needs, its refresh-token policy, and the rules a configuration can break
without being malformed. Adding a provider is one entry in `PRESETS` (and its docs:
README's preset list, docs/configuration.md). The modules that act on these facts
(config, authorize, oauth, provider_checks, probe, scheduler) read them from here.

Standard library only and free of mailoauthd imports, so that the helper may read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType

# The preset of a provider that is none of the known ones: everything from the config.
GENERIC = "generic"


def _frozen(**values: str) -> Mapping[str, str]:
    return MappingProxyType(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cloud:
    """One of a provider's national clouds: where it signs in, and its mail resources."""

    login_host: str
    mail_host: str  # the resource of delegated (signed-in) mail scopes
    app_mail_host: str  # the resource of app-only (client_credentials) mail scopes


@dataclass(frozen=True, slots=True, kw_only=True)
class MailServers:
    """The provider's own mail service, as "host:port" for implicit TLS or STARTTLS."""

    imap: str
    smtp: str  # submission
    pop3: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """
    What one provider needs. Endpoints and scopes may name `{login_host}`, `{tenant}`
    and `{mail_host}`, filled from the profile's tenant and cloud (`clouds`).
    """

    name: str
    endpoints: Mapping[str, str] = field(default_factory=_frozen)
    scopes: tuple[str, ...] = ()
    # National clouds, the first the default; empty: the preset has no tenant or cloud.
    clouds: Mapping[str, Cloud] = field(default_factory=lambda: MappingProxyType({}))
    default_tenant: str | None = None
    # Tenants that name no single directory (client_credentials needs one).
    shared_tenants: tuple[str, ...] = ()
    # Why it refuses a client_credentials (app-only) grant for mail (None: it offers
    # one), and the scope such a grant asks for by default (None: the profile's scopes).
    client_credentials_refused: str | None = None
    app_only_scope: str | None = None
    mail_servers: MailServers | None = None  # for the default cloud only
    # Sent on every sign-in; a profile's authorize_params override them.
    authorize_params: Mapping[str, str] = field(default_factory=_frozen)
    redirect_host: str = "127.0.0.1"  # of the loopback redirect URI
    scopes_on_refresh: bool = False  # name the account's scopes on each refresh
    refresh_token_max_idle: timedelta | None = None
    # `testing = true` allowed; the refresh-token lifetime of an app in testing status.
    testing_max_age: timedelta | None = None
    # ID token issuers: fixed ones, or "{base}/{tid}/v2.0" on the sign-in host.
    id_token_issuers: frozenset[str] = frozenset()
    id_token_issuer_per_tenant: bool = False
    # check-config: the problem when no client secret is set (None: a secret is optional).
    public_client_problem: str | None = None
    # check-config: scope fragments the device flow refuses.
    device_flow_refuses: tuple[str, ...] = ()
    one_resource_per_token: bool = False
    # The access-token audiences (JWT `aud`) its mail servers take; empty: unknown.
    mail_audiences: frozenset[str] = frozenset()


# Microsoft's national clouds. The global cloud grants delegated mail scopes on
# outlook.office.com but app-only ones on outlook.office365.com.
_MICROSOFT_CLOUDS = MappingProxyType(
    {
        "global": Cloud(
            login_host="login.microsoftonline.com",
            mail_host="outlook.office.com",
            app_mail_host="outlook.office365.com",
        ),
        "usgov": Cloud(
            login_host="login.microsoftonline.us",
            mail_host="outlook.office365.us",
            app_mail_host="outlook.office365.us",
        ),
        "china": Cloud(
            login_host="login.chinacloudapi.cn",
            mail_host="partner.outlook.cn",
            app_mail_host="partner.outlook.cn",
        ),
    }
)
_MICROSOFT_BASE = "https://{login_host}/{tenant}/oauth2/v2.0"

MICROSOFT = Preset(
    name="microsoft",
    endpoints=_frozen(
        authorization_endpoint=f"{_MICROSOFT_BASE}/authorize",
        token_endpoint=f"{_MICROSOFT_BASE}/token",
        device_authorization_endpoint=f"{_MICROSOFT_BASE}/devicecode",
    ),
    scopes=(
        "https://{mail_host}/IMAP.AccessAsUser.All",
        "https://{mail_host}/POP.AccessAsUser.All",
        "https://{mail_host}/SMTP.Send",
        "offline_access",
    ),
    clouds=_MICROSOFT_CLOUDS,
    default_tenant="common",
    shared_tenants=("common", "organizations", "consumers"),
    app_only_scope="https://{app_mail_host}/.default",
    mail_servers=MailServers(
        imap="outlook.office365.com:993",
        smtp="smtp.office365.com:587",
        pop3="outlook.office365.com:995",
    ),
    # Microsoft's app registration portal accepts only http://localhost for loopback
    # redirects (any port), not http://127.0.0.1 (which RFC 8252 §8.3 prefers).
    redirect_host="localhost",
    # Microsoft issues a token for one resource at a time and wants the scopes named
    # on refresh; elsewhere we keep what was granted.
    scopes_on_refresh=True,
    # Microsoft's refresh tokens die after 90 days unused.
    refresh_token_max_idle=timedelta(days=90),
    # https://login.microsoftonline.com/{tid}/v2.0, on the cloud's own host.
    id_token_issuer_per_tenant=True,
    one_resource_per_token=True,
    mail_audiences=frozenset(
        {
            "https://outlook.office.com",
            "https://outlook.office365.com",
            "00000002-0000-0ff1-ce00-000000000000",
        }
    ),
)

GOOGLE = Preset(
    name="google",
    endpoints=_frozen(
        authorization_endpoint="https://accounts.google.com/o/oauth2/v2/auth",
        token_endpoint="https://oauth2.googleapis.com/token",  # noqa: S106 (a URL)
        device_authorization_endpoint="https://oauth2.googleapis.com/device/code",
        revocation_endpoint="https://oauth2.googleapis.com/revoke",
    ),
    scopes=("https://mail.google.com/",),
    client_credentials_refused="Google offers no client_credentials grant for Gmail",
    mail_servers=MailServers(
        imap="imap.gmail.com:993", smtp="smtp.gmail.com:587", pop3="pop.gmail.com:995"
    ),
    # Google issues a refresh token only with access_type=offline, and on a second
    # sign-in only with prompt=consent.
    authorize_params=_frozen(access_type="offline", prompt="consent"),
    # Google revokes the refresh tokens of apps in "testing" status after 7 days.
    testing_max_age=timedelta(days=7),
    id_token_issuers=frozenset({"https://accounts.google.com", "accounts.google.com"}),
    public_client_problem=(
        "Google's token endpoint wants the client secret even of a desktop app; "
        "set client_secret_file or client_secret_command (the secret is in the "
        "OAuth client's JSON download)"
    ),
    device_flow_refuses=("mail.google.com", "/auth/gmail"),
)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {preset.name: preset for preset in (MICROSOFT, GOOGLE, Preset(name=GENERIC))}
)
# Every endpoint key a preset may fill in, in the order the configuration lists them.
ENDPOINT_KEYS = (
    "authorization_endpoint",
    "token_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
)


def cloud(preset: Preset, name: str | None) -> Cloud | None:
    """The named cloud of a preset, its default for None; None if it has no clouds."""
    if not preset.clouds:
        return None
    return preset.clouds[name or next(iter(preset.clouds))]


def defaults(preset: Preset, tenant: str | None, cloud_name: str | None) -> dict[str, object]:
    """A profile's values from its preset: endpoints, scopes, refresh-token policy."""
    where = cloud(preset, cloud_name)
    fill = {
        "tenant": tenant or preset.default_tenant or "",
        "login_host": where.login_host if where else "",
        "mail_host": where.mail_host if where else "",
    }
    values: dict[str, object] = {
        key: template.format(**fill) for key, template in preset.endpoints.items()
    }
    values["scopes"] = tuple(scope.format(**fill) for scope in preset.scopes)
    if preset.refresh_token_max_idle is not None:
        values["refresh_token_max_idle"] = preset.refresh_token_max_idle
    return values


def app_only_scopes(preset: Preset, cloud_name: str | None) -> tuple[str, ...] | None:
    """The scopes of a client_credentials grant, or None: the profile's own scopes."""
    if preset.app_only_scope is None:
        return None
    where = cloud(preset, cloud_name)
    return (preset.app_only_scope.format(app_mail_host=where.app_mail_host if where else ""),)


def mail_servers(preset: Preset, cloud_name: str | None) -> MailServers | None:
    """The preset's mail servers, known for its default cloud only."""
    default = next(iter(preset.clouds), None)
    return preset.mail_servers if cloud_name in (None, default) else None


# --- Microsoft identity platform error codes (AADSTS) -------------------------------

MICROSOFT_CODE = re.compile(r"AADSTS(\d+)")
# Microsoft codes that are not what their OAuth error code says.
MICROSOFT_THROTTLE = frozenset({"50196"})  # "the server terminated an operation" (a loop)
MICROSOFT_MISCONFIGURED = frozenset({"9001023", "90009", "900144", "700016", "7000215"})

# Microsoft identity platform codes people actually hit, as "what happened; what to do".
MICROSOFT_EXPLANATIONS = MappingProxyType(
    {
        "70008": (
            "the refresh token has expired or was revoked",
            "run 'mailoauth authorize {account}' to sign in again",
        ),
        "700082": (
            "the refresh token expired after a long time unused, past the inactivity limit",
            "run 'mailoauth authorize {account}' to sign in again",
        ),
        "50076": (
            "the tenant now requires multi-factor authentication for this sign-in",
            "run 'mailoauth authorize {account}' and complete MFA in the browser",
        ),
        "65001": (
            "the user or an administrator has not consented to the app's permissions",
            "have an administrator grant consent, then run 'mailoauth authorize {account}'",
        ),
        "7000215": (
            "the client secret is wrong",
            "check client_secret_file / client_secret_command (copy the secret's value, "
            "not its ID)",
        ),
        "7000222": (
            "the client secret has expired",
            "create a new client secret in the app registration and update the config",
        ),
        "700016": (
            "the app (client_id) was not found in this tenant",
            "check client_id and tenant, or have the app consented in this tenant",
        ),
        "70011": (
            "a requested scope is invalid for this app",
            "check the scopes configured for this provider",
        ),
        "50196": (
            "Microsoft throttled repeated requests for this account (a request loop)",
            "mailoauthd waits before it asks again; check what asks for tokens so often",
        ),
        "9001023": (
            "the requested scopes belong to more than one resource",
            "ask for the scopes of one resource only (e.g. only outlook.office.com ones)",
        ),
        "9002313": (
            "the request was malformed or invalid",
            "check tenant, client_id and scopes in the configuration",
        ),
        # Codes people meet while signing in rather than while refreshing.
        "50173": (
            "the grant expired because the password was changed or reset",
            "run 'mailoauth authorize {account}' to sign in again",
        ),
        "50011": (
            "the redirect URI is not registered for this app",
            "add http://localhost as a 'Mobile and desktop applications' redirect URI",
        ),
        "500113": (
            "the app registration has no redirect URI",
            "add http://localhost as a 'Mobile and desktop applications' redirect URI",
        ),
        "7000218": (
            "the app needs a client secret, or must allow public client flows",
            "set client_secret_file, or enable 'Allow public client flows' in the app registration",
        ),
        "50020": (
            "this user's account is not in the app's tenant",
            "sign in with an account of that tenant, or set tenant to 'common' or 'organizations'",
        ),
        "53003": (
            "a Conditional Access policy blocked the sign-in",
            "ask your administrator which policy applies to this app and device",
        ),
    }
)

# check-config --online: Microsoft codes that say the client, not the grant, is wrong.
MICROSOFT_CLIENT_CODES = MappingProxyType(
    {
        "90002": (
            "the tenant was not found",
            "check tenant: your directory's domain (contoso.onmicrosoft.com) or its ID",
        ),
        "700016": (
            "the application (client_id) was not found in this tenant",
            "check client_id (the app registration's 'Application (client) ID') and tenant",
        ),
        "7000215": (
            "the client secret is wrong",
            "copy the secret's Value, not its Secret ID, into client_secret_file",
        ),
        "7000222": (
            "the client secret has expired",
            "create a new client secret in the app registration and put its value in "
            "client_secret_file",
        ),
    }
)

# Microsoft Graph's audiences: Microsoft's mail servers refuse its tokens.
MICROSOFT_GRAPH_AUDIENCES = frozenset(
    {"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"}
)

# --- Google -------------------------------------------------------------------------

# Google's wording of invalid_grant for a refresh token past an app's testing limit.
GOOGLE_TESTING_EXPIRED = "Token has been expired or revoked"

# Google's invalid_grant for a refresh token of an app in testing status, explained.
GOOGLE_TESTING_EXPLANATION = (
    "Google revokes refresh tokens of apps in 'testing' status after 7 days",
    "run 'mailoauth authorize {account}'; publish the app to avoid the 7-day limit",
)
