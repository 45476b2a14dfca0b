"""
`mailoauth recipe CLIENT ACCOUNT`: a mail program's configuration, filled in for an account.

The recipes are the fenced blocks marked `<!-- recipe: NAME -->` on docs/clients/CLIENT.md,
the very blocks the end-to-end suite runs against a real Dovecot (tests/e2e/recipes.py):
what this prints is what CI proved, with the documentation's example account (user
alice@contoso.com, account `work`, Microsoft 365's servers) replaced by the account's own.
A wheel installs the pages under share/mailoauthd/clients/. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mailoauthd import errors, protocol, shared_files
from mailoauthd.helper import transport

# The documentation's example account, and where its values appear in the recipes.
DOC_USER = "alice@contoso.com"
DOC_ACCOUNT = "work"
DOC_IMAP = ("outlook.office365.com", "993")
DOC_SMTP = ("smtp.office365.com", "587")
_MARKER = re.compile(r"<!-- recipe: ([\w.-]+) -->\n```[a-z]*\n(.*?)\n```", re.DOTALL)


def pages() -> dict[str, Path]:
    """Every client with recipes: its name -> its page."""
    directory = _directory()
    return {
        page.stem: page
        for page in sorted(directory.glob("*.md"))
        if _MARKER.search(page.read_text(encoding="utf-8"))
    }


def _directory() -> Path:
    return shared_files.find("share/mailoauthd/clients/README.md", "docs/clients/README.md").parent


def blocks(page: Path) -> list[tuple[str, str]]:
    """(name, text) of each recipe on a page, in order."""
    return [(m.group(1), m.group(2) + "\n") for m in _MARKER.finditer(page.read_text("utf-8"))]


def fill(text: str, account: str, servers: dict[str, object]) -> str:
    """
    A recipe for `account`: the example's user, account name and servers replaced.

    Args:
        text: the recipe as documented.
        account: the account's name (`mailoauth token ACCOUNT`).
        servers: the daemon's `servers` answer: username, imap_server, smtp_server.
    """
    user = str(servers.get("username") or DOC_USER)
    text = text.replace(DOC_USER.replace("@", "%40"), user.replace("@", "%40"))
    text = text.replace(DOC_USER, user)
    for (host, port), key in ((DOC_IMAP, "imap_server"), (DOC_SMTP, "smtp_server")):
        server = servers.get(key)
        if not isinstance(server, str) or not server:
            continue
        new_host, _, new_port = server.rpartition(":")
        text = text.replace(f"{host}:{port}", f"{new_host}:{new_port}")
        # A port on its own (`Port 993`, `port = 993`) next to that host's name.
        if host in text:
            text = re.sub(rf"\b{port}\b", new_port, text)
        text = text.replace(host, new_host)
    return re.sub(rf"\b{DOC_ACCOUNT}\b", account, text)


def main(client_name: str, account: str, *, socket_path: str | None) -> int:
    """Print the client's recipes filled in for the account; returns the exit status."""
    found = pages()
    if client_name not in found:
        raise errors.UsageError(
            f"no recipe for {client_name!r}; there are recipes for: {', '.join(found)}"
        )
    request = protocol.encode({"v": protocol.VERSION, "op": "servers", "account": account})
    servers = transport.request_reply(request, socket_path, 10.0)
    recipes = blocks(found[client_name])
    for index, (name, text) in enumerate(recipes):
        if len(recipes) > 1:
            sys.stdout.write(("\n" if index else "") + f"# --- {name} ---\n")
        sys.stdout.write(fill(text, account, servers))
    missing = [key for key in ("imap_server", "smtp_server") if not servers.get(key)]
    if missing:
        sys.stderr.write(
            f"mailoauth: {account} has no {' or '.join(missing)} in the configuration: "
            "the recipe shows Microsoft 365's; set them, or edit the host names\n"
        )
    return 0
