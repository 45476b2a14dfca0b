"""
`mailoauth authorize --test PROFILE`: a trial sign-in with an OAuth profile, for no account.

It runs in this process, not in the daemon: it reads the configuration and the profile's
client secret itself (so run it as someone who can, root for a system install), signs in
exactly as `mailoauth authorize` would (browser, paste-back or device code; signin.py), and
instead of storing what came back reports it: token type, lifetime, refresh token or not,
scopes granted against those asked for, who signed in (the ID token), the access token's
audience and permissions when it is a JWT. It warns about the mistakes that otherwise
surface only later as a provider code in a log, then revokes what it got where the
provider can (RFC 7009) and forgets it. Nothing is written anywhere; no token is printed.

Run by `mailoauth authorize --test` (helper/commands.py) as
`python -m mailoauthd.authorization.trial`: the helper imports only the standard library, and
this needs trio and httpx.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import httpx
import structlog
import trio

from mailoauthd import config, paths, presets, proc
from mailoauthd.authorization import signin, signin_page
from mailoauthd.errors import MailoauthdError
from mailoauthd.flows import SIGN_IN_FLOWS, Flow
from mailoauthd.helper import signin_terminal
from mailoauthd.provider import discovery, idtoken, oauth, provider_http, provider_input
from mailoauthd.secret import Secret
from mailoauthd.storage.state import AccountState
from mailoauthd.storage.state import refreshed as refreshed_state

# Scopes whose grant lets a token log in to mail: Gmail's, Microsoft's IMAP/POP/SMTP
# permissions (and .default of the Outlook resource, for app-only), the development
# provider's "mail".
MAIL_SCOPE_MARKS = ("mail.google.com", "imap.", "pop.", "smtp.", "outlook.office", "mail")
# Scopes providers grant without echoing them back: not "missing" when absent.
_UNECHOED = frozenset({"openid", "offline_access", "profile", "email"})


class _Console:
    """The sign-in's Channel, here: events are shown as the helper shows them, and each
    line typed on stdin is a pasted address."""

    def __init__(self, label: str, *, open_browser: bool, browser_command: str | None) -> None:
        self.label = label
        self.open_browser = open_browser
        self.browser_command = browser_command

    async def send(self, message: dict[str, object]) -> None:
        signin_terminal.event(
            self.label,
            message,
            open_browser=self.open_browser,
            browser_command=self.browser_command,
        )

    async def receive(self) -> dict[str, object] | None:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                await trio.sleep_forever()  # no more input: only the browser can answer
            if text := line.strip():
                signin_terminal.say("Checking that address...")
                return {"op": "redirect", "url": text}


def _mail_scopes(scopes: tuple[str, ...]) -> list[str]:
    return [s for s in scopes if any(mark in s.lower() for mark in MAIL_SCOPE_MARKS)]


def _jwt(token: str) -> dict[str, object] | None:
    return provider_input.jwt_claims(token)


def _text(value: object, limit: int = 200) -> str:
    if isinstance(value, list):
        return ", ".join(provider_input.clean_text(str(v), limit) for v in value)
    return provider_input.clean_text(str(value), limit)


def report(
    account: config.Account, tokens: oauth.TokenSet, now: datetime
) -> tuple[list[str], list[str]]:
    """What came back, line by line, and the warnings; no token appears in either."""
    provider = account.provider
    lines, warnings = [], []
    lifetime = round((tokens.expires_at - now).total_seconds())
    lines.append(f"token type: {tokens.token_type}; the access token lives {lifetime} s")
    lines.append(f"refresh token: {'yes' if tokens.refresh_token else 'NO'}")
    if tokens.refresh_token is None:
        warnings.append(
            "no refresh token: mailoauthd could use this grant only until the access token "
            "expires. Ask for offline access: add 'offline_access' to scopes (Microsoft and "
            "most providers); Google needs access_type=offline (the google preset sends it)"
        )
    asked = account.scopes
    lines.append(f"scopes asked for: {' '.join(asked) or '(none)'}")
    if tokens.scopes is None:
        lines.append("scopes granted: the provider did not say")
    else:
        granted = tokens.scopes
        lines.append(f"scopes granted: {_text(' '.join(granted), 500) or '(none)'}")
        missing = [s for s in asked if s not in granted and s not in _UNECHOED]
        if missing:
            lines.append(f"asked for but not granted: {' '.join(missing)}")
        if not _mail_scopes(granted):
            warnings.append(
                "no mail scope was granted, so IMAP and SMTP will refuse the token: add the "
                "mail permission to the app registration (Microsoft: IMAP.AccessAsUser.All and "
                "SMTP.Send of Office 365 Exchange Online; Google: https://mail.google.com/) "
                "and to scopes"
            )
    if tokens.id_token is not None:
        identity = idtoken.id_token_claims(tokens.id_token) or {}
        who = [
            f"{claim} {_text(identity[claim])}"
            for claim in (*idtoken.IDENTITY_CLAIMS, "tid")
            if claim in identity
        ]
        lines.append(f"signed in as: {'; '.join(who) or 'the ID token names nobody'}")
    claims = _jwt(tokens.access_token.reveal())
    if claims is None:
        lines.append("access token: opaque (not a JWT; only the provider can read it)")
    else:
        audience = claims.get("aud")
        permissions = claims.get("scp") or claims.get("roles")
        lines.append(
            f"access token: a JWT for audience {_text(audience)}"
            + (f"; permissions {_text(permissions)}" if permissions else "")
        )
        audiences = set(audience if isinstance(audience, list) else [audience])
        mail_audiences = presets.PRESETS[provider.preset].mail_audiences
        if audiences & presets.MICROSOFT_GRAPH_AUDIENCES:
            warnings.append(
                "the access token is for Microsoft Graph, which IMAP and SMTP refuse: ask for "
                "https://outlook.office.com/IMAP.AccessAsUser.All and "
                "https://outlook.office.com/SMTP.Send instead of Graph's Mail.* scopes"
            )
        elif mail_audiences and not audiences & mail_audiences:
            warnings.append(
                f"the access token's audience {_text(audience)} is not Outlook's "
                "(https://outlook.office.com): the mail servers will refuse it"
            )
    if provider.preset == "google" and provider.testing:
        warnings.append(
            "the Google app is in 'testing' status: its refresh tokens end after 7 days; "
            "publish the app (OAuth consent screen) for lasting access"
        )
    return lines, warnings


async def _revoke(
    client: oauth.Client, endpoint: str | None, tokens: oauth.TokenSet, http: httpx.AsyncClient
) -> str:
    if not endpoint:
        return (
            "The provider has no revocation endpoint: the grant stays until it expires, or "
            "until you remove the app's access in the account's security settings."
        )
    token, hint = (
        (tokens.refresh_token, "refresh_token")
        if tokens.refresh_token is not None
        else (tokens.access_token, "access_token")
    )
    request = oauth.revocation_request(client, endpoint, token, hint)
    try:
        with trio.fail_after(30):
            response = await provider_http.send(http, request, what="the revocation endpoint")
    except (MailoauthdError, trio.TooSlowError) as exc:
        return f"Could not revoke it ({getattr(exc, 'message', 'no answer within 30 s')})."
    if response.status_code == 200:
        return "Revoked it at the provider (RFC 7009)."
    return f"The revocation endpoint answered HTTP {response.status_code}; it may still be valid."


async def _trial(
    account: config.Account,
    secret: Secret | None,
    flow: str,
    console: _Console,
    limit: float,
) -> int:
    got: list[oauth.TokenSet] = []

    async def keep(tokens: oauth.TokenSet) -> AccountState:
        got.append(tokens)  # held in memory only, for the report; never written
        return refreshed_state(AccountState(account=account.name), tokens, oauth.now_utc())

    async with httpx.AsyncClient(timeout=limit + 5, follow_redirects=False) as http:
        if account.provider.issuer:
            found = discovery.Discovery(http, timeout=limit)
            account = await found.account(account)
        provider = account.provider
        if not provider.token_endpoint:
            raise MailoauthdError(
                f"[providers.{provider.name}] has no token_endpoint",
                hint="set token_endpoint or issuer",
            )
        client = oauth.Client(
            token_endpoint=provider.token_endpoint,
            client_id=provider.client_id,
            client_secret=secret,
            auth_method=provider.token_auth_method,
        )
        session = signin.Session(
            account=account,
            client=client,
            http=http,
            request_timeout=limit,
            now=oauth.now_utc,
            store=keep,
        )
        final = await signin.run(session, console, flow)
        if final.get("ok") is not True or not got:
            raise MailoauthdError(str(final.get("message") or "the sign-in was cancelled"))
        tokens = got[0]
        lines, warnings = report(account, tokens, oauth.now_utc())
        outcome = await _revoke(client, provider.revocation_endpoint, tokens, http)
    say = signin_terminal.say
    say()
    say(f"Trial sign-in with [providers.{provider.name}]: the provider answered")
    for line in lines:
        say(f"  {line}")
    for warning in warnings:
        say(f"  ! {warning}")
    say(f"{outcome} The tokens are forgotten; nothing was stored.")
    if warnings:
        say(f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}: fix the profile first.")
        return 1
    say(f"The profile works: attach accounts to it ('provider = \"{provider.name}\"').")
    return 0


def run(
    profile: str,
    *,
    config_path: str | None,
    flow: str | None,
    open_browser: bool,
    browser_command: str | None,
) -> int:
    """Sign in with `profile` for no account, report and revoke; returns the exit status."""
    # The sign-in's own log lines would only repeat what is shown here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    proc.forbid_core_dumps()  # tokens pass through this process's memory
    env = dict(os.environ)
    path = Path(config_path or paths.config_path(env, system=os.geteuid() == 0))
    try:
        cfg = config.load(path)
        if profile not in cfg.providers:
            known = ", ".join(cfg.providers) or "none"
            raise MailoauthdError(
                f"{path}: there is no [providers.{profile}]", hint=f"defined: {known}"
            )
        provider = cfg.providers[profile]
        source = provider.client_secret
        secret = (
            source.read(where=f"{cfg.source}: [providers.{profile}] client_secret")
            if source is not None
            else None
        )
        account = config.Account(
            name=signin_page.TRIAL_PREFIX + profile,
            provider=provider,
            scopes=provider.scopes,
            flow=Flow(flow or Flow.AUTHORIZATION_CODE),
        )
        console = _Console(
            f"[providers.{profile}] (trial)",
            open_browser=open_browser,
            browser_command=browser_command,
        )
        timeout = cfg.daemon.request_timeout.total_seconds()
        return trio.run(_trial, account, secret, account.flow, console, timeout)
    except MailoauthdError as exc:
        sys.stderr.write(f"mailoauth: {exc}\n")
        return 1


def main(argv: list[str]) -> int:
    """
    `python -m mailoauthd.authorization.trial PROFILE [options]`: what
    `mailoauth authorize --test` runs.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="mailoauth authorize --test")
    parser.add_argument("profile")
    parser.add_argument("--config")
    parser.add_argument("--flow", choices=SIGN_IN_FLOWS)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--browser-command")
    args = parser.parse_args(argv)
    try:
        return run(
            args.profile,
            config_path=args.config,
            flow=args.flow,
            open_browser=not args.no_browser,
            browser_command=args.browser_command,
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
