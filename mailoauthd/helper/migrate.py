"""
`mailoauth import ACCOUNT --from TOOL [SOURCE]`: take over another tool's refresh token.

A refresh token works only with the OAuth client that got it, so each reader also
returns the client ID the other tool used, when its files say; the daemon refuses
the import when that is not the account's client_id (`import` with `client_id`).

- mutt_oauth2: mutt's and NeoMutt's mutt_oauth2.py keep a JSON token file encrypted
  with their ENCRYPTION_PIPE; it is read through its DECRYPTION_PIPE (`gpg --decrypt`
  unless --decrypt-command says otherwise). The file names the registration
  ("google", "microsoft"), not the client ID, which lives in the script.
- oama: a JSON record per e-mail address, in ~/.local/var/oama/EMAIL.oauth encrypted
  with GPG, or in the GNOME keyring (`secret-tool lookup oama EMAIL`); the client ID
  is the service's in ~/.config/oama/config.yaml.
- email-oauth2-proxy: its configuration file caches each account's refresh token,
  encrypted with a key derived from the account's password (PBKDF2-HMAC-SHA256,
  Fernet); the password is asked for. Needs the `cryptography` package.
- getmail: getmail-gmail-xoauth-tokens's JSON token file (client_id, refresh_token).

Standard library only: email-oauth2-proxy's Fernet needs `cryptography`, so
mailoauthd/migrate_fernet.py opens it in a child interpreter.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mailoauthd import errors

SOURCES = ("mutt_oauth2", "oama", "email-oauth2-proxy", "getmail")
DECRYPT = ["gpg", "--quiet", "--batch", "--decrypt"]
# email-oauth2-proxy's default, for entries that do not say.
EMAILPROXY_ITERATIONS = 1_200_000


@dataclass
class Found:
    """A refresh token read from another tool, and what is known about who got it."""

    refresh_token: str
    client_id: str | None
    source: str
    notes: list[str] = field(default_factory=list)


def _fail(message: str) -> errors.MailoauthdError:
    return errors.MailoauthdError(message)


def _decrypt(path: Path, command: list[str]) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        done = subprocess.run(command, input=data, capture_output=True, check=False, timeout=120)
    except OSError as exc:
        raise _fail(f"cannot run {command[0]!r} to decrypt {path}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise _fail(f"{command[0]!r} did not decrypt {path} within 120 s") from None
    if done.returncode:
        # Its stderr names keys and files, never the plaintext: worth showing.
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no reason"]
        raise _fail(
            f"{' '.join(command)} could not decrypt {path} (exit {done.returncode}: {why[0]})"
        )
    return done.stdout


def _json(data: bytes, what: str) -> dict[str, object]:
    try:
        found = json.loads(data)
    except ValueError:
        raise _fail(f"{what} is not JSON: not a file of that tool, or not decrypted") from None
    if not isinstance(found, dict):
        raise _fail(f"{what} is not a JSON object")
    return found


def _refresh_token(record: dict[str, object], what: str) -> str:
    token = record.get("refresh_token")
    if not isinstance(token, str) or not token:
        raise _fail(f"{what} holds no refresh token (sign in with that tool first)")
    return token


def mutt_oauth2(path: Path, decrypt: list[str] | None) -> Found:
    """mutt_oauth2.py's token file, through its decryption command."""
    command = decrypt or DECRYPT
    record = _json(_decrypt(path, command), f"{path}, decrypted with {command[0]}")
    registration = record.get("registration")
    notes = [
        f"mutt_oauth2.py's token file names the registration {registration!r}, not its "
        "client ID: the token works only if this account's client_id is the one in that "
        "registration of your mutt_oauth2.py"
    ]
    return Found(_refresh_token(record, str(path)), None, f"mutt_oauth2 {path}", notes)


def getmail(path: Path) -> Found:
    """getmail-gmail-xoauth-tokens's JSON token file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None
    record = _json(data, str(path))
    client_id = record.get("client_id")
    return Found(
        _refresh_token(record, str(path)),
        client_id if isinstance(client_id, str) and client_id else None,
        f"getmail {path}",
    )


def _oama_client_id(config: Path, service: str) -> str | None:
    """services.SERVICE.client_id of oama's config.yaml, read without a YAML library."""
    try:
        lines = config.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    section = None
    for line in lines:
        text = line.split("#", 1)[0].rstrip()
        if not text.strip():
            continue
        indent = len(text) - len(text.lstrip())
        if indent == 0:
            section = text.strip().rstrip(":")
            service_now = None
            continue
        if section != "services":
            continue
        key, _, value = text.strip().partition(":")
        if indent <= 2 and not value.strip():
            service_now = key.strip()
        elif service_now == service and key.strip() == "client_id":
            return value.strip().strip("'\"") or None
    return None


def oama(source: str | None, email: str, env: dict[str, str], decrypt: list[str] | None) -> Found:
    """oama's record for an e-mail address: its GPG file, else the GNOME keyring."""
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    address = source or email
    path = Path(address) if "/" in address else home / ".local/var/oama" / f"{address}.oauth"
    if path.exists():
        record = _json(_decrypt(path, decrypt or DECRYPT), f"{path}, decrypted")
        where = str(path)
    else:
        try:
            done = subprocess.run(
                ["secret-tool", "lookup", "oama", address],
                capture_output=True,
                check=False,
                timeout=60,
            )
        except OSError:
            raise _fail(f"no {path}, and no secret-tool to look in the GNOME keyring") from None
        if done.returncode or not done.stdout.strip():
            raise _fail(f"oama has no record for {address}: neither {path} nor in the keyring")
        record = _json(done.stdout, f"oama's keyring entry for {address}")
        where = f"the keyring entry for {address}"
    service = record.get("service")
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    client_id = None
    if isinstance(service, str):
        client_id = _oama_client_id(config_home / "oama" / "config.yaml", service)
    notes = [] if client_id else ["oama's config.yaml does not say which client got the token"]
    return Found(_refresh_token(record, where), client_id, f"oama {where}", notes)


def email_oauth2_proxy(config: Path, username: str, password: str) -> Found:
    """An account's cached refresh token from email-oauth2-proxy's configuration file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(config.read_text(encoding="utf-8"))
    except (OSError, configparser.Error) as exc:
        raise _fail(f"cannot read {config}: {exc}") from None
    if not parser.has_section(username):
        accounts = [s for s in parser.sections() if "@" in s]
        raise _fail(f"{config} has no [{username}] section (it has: {', '.join(accounts)})")
    entry = parser[username]
    sealed, salt = entry.get("refresh_token"), entry.get("token_salt")
    if not sealed or not salt:
        raise _fail(f"{config}: [{username}] holds no cached refresh token yet")
    iterations = int(entry.get("token_iterations") or EMAILPROXY_ITERATIONS)
    token = _open_sealed(password, salt, sealed, iterations)
    if token is None:
        raise _fail(f"wrong password for {username}: {config}'s token does not open")
    client_id = entry.get("client_id") or _catch_all(parser, "client_id")
    return Found(token, client_id or None, f"email-oauth2-proxy {config} [{username}]")


def _open_sealed(password: str, salt: str, sealed: str, iterations: int) -> str | None:
    """
    Fernet needs `cryptography`, which the helper never imports: a child interpreter
    (mailoauthd/migrate_fernet.py) opens the token; the secrets go over its stdin.
    """
    asked = {"password": password, "salt": salt, "sealed": sealed, "iterations": iterations}
    done = subprocess.run(
        [sys.executable, "-P", "-m", "mailoauthd.migrate_fernet"],
        input=json.dumps(asked),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 1:  # migrate_fernet.WRONG_PASSWORD
        return None
    if done.returncode == 2:  # migrate_fernet.NO_CRYPTOGRAPHY
        raise _fail(
            "reading email-oauth2-proxy's tokens needs the 'cryptography' package: "
            "pip install cryptography, into the environment mailoauth runs from"
        )
    if done.returncode:
        raise _fail(f"could not open email-oauth2-proxy's token: {done.stderr.strip()}")
    return done.stdout


def _catch_all(parser: configparser.ConfigParser, key: str) -> str | None:
    """email-oauth2-proxy's catch-all account section ('@domain' or '@'), if any."""
    for section in parser.sections():
        if section.startswith("@") and parser[section].get(key):
            return parser[section].get(key)
    return None


def _password(username: str) -> str:
    """The account's password for email-oauth2-proxy: asked on the terminal, else stdin."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"email-oauth2-proxy password for {username}: ")
    return sys.stdin.readline().rstrip("\n")


def read(
    kind: str,
    source: str | None,
    *,
    username: str,
    decrypt: str | None,
) -> Found:
    """
    The refresh token and client ID another tool kept for an account.

    Args:
        kind: one of SOURCES.
        source: the file (or e-mail address for oama) named on the command line.
        username: the account's username: the default oama address and proxy section.
        decrypt: a decryption command to use instead of `gpg --decrypt` (split on spaces).
    """
    command = decrypt.split() if decrypt else None
    if kind == "oama":
        return oama(source, username, dict(os.environ), command)
    if not source:
        what = "CONFIG" if kind == "email-oauth2-proxy" else "FILE"
        raise errors.UsageError(f"--from {kind} needs the {what} to read")
    path = Path(os.path.expanduser(source))
    if kind == "mutt_oauth2":
        return mutt_oauth2(path, command)
    if kind == "getmail":
        return getmail(path)
    if not username:
        raise errors.UsageError("the account has no username to look up")
    return email_oauth2_proxy(path, username, _password(username))


def describe(found: Found) -> str:
    """One line for stderr: where the token came from; never the token."""
    who = f", client {found.client_id}" if found.client_id else ""
    return f"read a refresh token from {found.source}{who}"
