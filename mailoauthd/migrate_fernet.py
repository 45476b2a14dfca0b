"""
Opens email-oauth2-proxy's sealed refresh token: the one step of `mailoauth import
--from email-oauth2-proxy` that needs a third-party package (`cryptography`).

The helper imports only the standard library, so helper/migrate.py runs this as a
child (`python -m mailoauthd.migrate_fernet`): a JSON object on stdin (password, salt,
sealed token, iterations; never on the command line, where `ps` would show them), the
token on stdout. Exit status 1: the password does not open it; 2: no `cryptography`.
"""

from __future__ import annotations

import base64
import json
import sys

WRONG_PASSWORD = 1
NO_CRYPTOGRAPHY = 2


def open_sealed(password: str, salt: str, sealed: str, iterations: int) -> str | None:
    """
    The token email-oauth2-proxy sealed (PBKDF2-HMAC-SHA256 key, Fernet); None if it does not open.

    Args:
        password: the account's password.
        salt: the base64 `token_salt` from its configuration.
        sealed: the `refresh_token` from its configuration.
        iterations: its `token_iterations`.

    Raises:
        ImportError: `cryptography` is not installed.
    """
    from cryptography.fernet import Fernet, InvalidToken
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=32,
        salt=base64.b64decode(salt),
        iterations=iterations,
    )
    key = base64.urlsafe_b64encode(kdf.derive(password.encode("utf-8")))
    try:
        return Fernet(key).decrypt(sealed.encode("utf-8")).decode("utf-8")
    except InvalidToken:
        return None


def main() -> int:
    """Read the request on stdin, write the token on stdout; returns the exit status."""
    asked = json.loads(sys.stdin.read())
    try:
        token = open_sealed(
            asked["password"], asked["salt"], asked["sealed"], int(asked["iterations"])
        )
    except ImportError:
        return NO_CRYPTOGRAPHY
    if token is None:
        return WRONG_PASSWORD
    sys.stdout.write(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
