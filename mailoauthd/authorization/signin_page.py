"""
The pages the browser sees at the end of a sign-in, on the daemon's loopback listener.

A small centred card in the system font: what happened, for which account and
mailbox, and where to go next. The page is static HTML with one inline style
sheet, which the Content-Security-Policy allows by its SHA-256 hash and nothing
else: no script, no image, no font, no frame, no form, nothing fetched from
anywhere. The address the browser came with holds the authorization code: the
page never repeats it, and Referrer-Policy keeps the browser from passing it on.
"""

from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass, field
from datetime import UTC, datetime

STYLE = (
    ":root{color-scheme:light dark}"
    "body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;"
    "font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;"
    "background:#f3f4f6;color:#111827}"
    "main{box-sizing:border-box;max-width:30rem;width:calc(100% - 2rem);margin:1rem;"
    "padding:2rem 2.25rem;background:#fff;border-radius:12px;"
    "box-shadow:0 1px 3px rgba(0,0,0,.12),0 8px 24px rgba(0,0,0,.08);"
    "border-top:6px solid #6b7280}"
    "main.ok{border-top-color:#16a34a}main.error{border-top-color:#dc2626}"
    "h1{margin:0 0 .75rem;font-size:1.375rem;line-height:1.3}"
    "p{margin:.5rem 0}p.next{margin-top:1.25rem;color:#4b5563}"
    "code,b{overflow-wrap:anywhere}"
    "code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;"
    "background:#f3f4f6;padding:.1em .35em;border-radius:4px}"
    "@media (prefers-color-scheme:dark){body{background:#111827;color:#f9fafb}"
    "main{background:#1f2937}p.next{color:#d1d5db}code{background:#374151}}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# default-src 'none' forbids scripts, images, fonts, frames and connections; the one
# style sheet is allowed by its hash. base-uri, form-action and frame-ancestors do not
# fall back to default-src, so they are closed one by one.
CSP = (
    f"default-src 'none'; style-src '{STYLE_HASH}'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
CLOSE = "You can close this window and return to your terminal."
# The account name of a trial sign-in (`mailoauth authorize --test PROFILE`).
TRIAL_PREFIX = "--test "
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found"}
_REASONS |= {405: "Method Not Allowed", 409: "Conflict"}


@dataclass(frozen=True, slots=True)
class Page:
    """One page: its HTTP status, heading, paragraphs (HTML, already escaped) and last line."""

    status: int
    title: str
    paragraphs: list[str] = field(default_factory=list)
    next_step: str | None = None  # HTML: where to go from here
    tone: str = "info"  # "ok", "error" or "info": the card's colour


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _retry(account: str) -> str:
    return (
        f"To try again, run <code>{_e(f'mailoauth authorize {account}')}</code> in your terminal."
    )


def signed_in(account: str, mailbox: str | None, expires_at: datetime | None) -> Page:
    """The sign-in worked and the tokens are stored (or, for a trial, are being reported)."""
    if account.startswith(TRIAL_PREFIX):
        profile = account[len(TRIAL_PREFIX) :]
        text = f"The trial sign-in with the profile <b>{_e(profile)}</b> worked."
        report = "Return to your terminal for what the provider sent; nothing is kept."
        return Page(200, "Trial sign-in done", [text], _e(report), "ok")
    who = f"<b>{_e(account)}</b>"
    if mailbox:
        who += f", signed in as <b>{_e(mailbox)}</b>"
    paragraphs = [f"mailoauthd now holds the tokens for {who}."]
    if expires_at is not None:
        when = expires_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        paragraphs.append(
            f"The access token is valid until {_e(when)}; mailoauthd renews it on its own."
        )
    return Page(200, "Signed in", paragraphs, _e(CLOSE), "ok")


def failed(status: int, title: str, account: str, message: str, hint: str | None) -> Page:
    """
    The sign-in ended without tokens: the reason once, what to do, and the retry command.

    `message` may start with the account's name, as the helper's messages do: it is
    dropped here, where the heading says which account.
    """
    prefix = f"{account}: "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    message = message[:1].upper() + message[1:]
    paragraphs = [_e(message.rstrip(".") + ".")]
    again = f"run 'mailoauth authorize {account}' again"
    hint = (hint or "").replace(f"; {again}", "").replace(again, "").strip(" ;.")
    if hint:
        paragraphs.append(_e(hint[:1].upper() + hint[1:] + "."))
    return Page(status, title, paragraphs, _retry(account), "error")


def notice(status: int, title: str, text: str) -> Page:
    """Anything else: not found, not this sign-in, already finished."""
    return Page(status, title, [_e(text)])


def render(page: Page) -> bytes:
    """The page's HTML document: the body of the response."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<meta name='referrer' content='no-referrer'>"
        f"<title>mailoauthd: {_e(page.title)}</title><style>{STYLE}</style></head>"
        f"<body><main class='{page.tone}'><h1>{_e(page.title)}</h1>"
        + "".join(f"<p>{p}</p>" for p in page.paragraphs)
        + (f"<p class='next'>{page.next_step}</p>" if page.next_step else "")
        + "</main></body></html>\n"
    ).encode()


def reason(page: Page) -> str:
    """The reason phrase of the page's status line."""
    return _REASONS.get(page.status, "Error")


def headers(body: bytes) -> list[tuple[str, str]]:
    """The response's headers for a page whose document is `body`."""
    return [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        # The address holds the code: no page of ours may pass it on.
        ("Referrer-Policy", "no-referrer"),
        ("Content-Security-Policy", CSP),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
    ]
