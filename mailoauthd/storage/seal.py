"""
Sealing stored grants at rest: AES-256-GCM, bound to the account's name.

A sealed grant is one line of ASCII (the envelope), so that it reads the same
in a state file and in any other store:

    mailoauthd-sealed v1 KEYID BASE64(NONCE || CIPHERTEXT || TAG)

- `v1` is the envelope's version: a later format gets a new one, and this code
  refuses what it does not know instead of guessing.
- KEYID is 16 hex digits naming the key that sealed it (a hash of the key, which
  gives nothing of it away), so that opening needs no trial and a key missing
  from the key source is told apart from a blob that was altered.
- NONCE is 12 random bytes, new for every seal.
- The associated data is the header ("mailoauthd-sealed v1 KEYID ") followed by
  the account's name: a blob copied over another account's, or with its header
  edited, does not authenticate and is refused.

The key source holds base64 keys of 32 bytes, one a line: the first seals, all
open, so a new key is put first and the old one kept below it until `mailoauthd
rekey` has re-sealed everything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailoauthd.config import SecretSource
from mailoauthd.errors import STATE_KEY, ConfigError, StateError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"mailoauthd-sealed"
VERSION = b"v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_ENVELOPE = re.compile(rb"mailoauthd-sealed (v[0-9]+) ([0-9a-f]{16}) ([A-Za-z0-9+/=]+)\n?")


class SealError(StateError):
    """A sealed blob that cannot be opened: altered, swapped, or sealed with an unknown key."""


class UnknownKey(SealError):
    """Sealed with a key the key source does not hold: the wrong key, or one removed too soon."""

    code = STATE_KEY


def key_id(key: bytes) -> str:
    """The 16 hex digits that name a key in envelopes; reveal nothing of it."""
    return hashlib.sha256(b"mailoauthd key id\0" + key).hexdigest()[:16]


def is_sealed(blob: bytes) -> bool:
    """Whether `blob` is an envelope (of any version), rather than plain state."""
    return blob.startswith(MAGIC + b" ")


def envelope_key(blob: bytes) -> str | None:
    """The key id in an envelope's header, or None if the header is not one we know."""
    found = _ENVELOPE.fullmatch(blob)
    return found.group(2).decode("ascii") if found and found.group(1) == VERSION else None


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys of one key source; the first seals, all open."""

    keys: tuple[bytes, ...] = field(repr=False)
    source: str  # names the key source in messages, e.g. "[store] encryption_key_file /x"

    def __post_init__(self) -> None:
        if not self.keys or any(len(key) != KEY_BYTES for key in self.keys):
            raise ValueError("a Keyring needs one or more keys of 32 bytes")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id(key) for key in self.keys)

    @property
    def sealing_id(self) -> str:
        return key_id(self.keys[0])

    def seal(self, account: str, plaintext: bytes) -> bytes:
        """The envelope of `plaintext`, sealed with the first key and bound to `account`."""
        header = b"%s %s %s " % (MAGIC, VERSION, self.sealing_id.encode("ascii"))
        nonce = os.urandom(NONCE_BYTES)
        sealed = _aesgcm(self.keys[0]).encrypt(nonce, plaintext, header + account.encode("utf-8"))
        return header + base64.b64encode(nonce + sealed) + b"\n"

    def open(self, account: str, blob: bytes, *, where: str) -> bytes:
        """
        The plaintext of an envelope sealed for `account`.

        Args:
            account: the account it must belong to.
            blob: the envelope.
            where: names the blob in messages (a file, a key).

        Raises:
            UnknownKey: sealed with a key this key source does not hold.
            SealError: not an envelope we know, altered, or sealed for another account.
        """
        found = _ENVELOPE.fullmatch(blob)
        if found is None or found.group(1) != VERSION:
            version = found.group(1).decode("ascii") if found else "?"
            raise SealError(
                f"{where}: not a sealed state this version of mailoauthd can read "
                f"(envelope {version})"
            )
        kid = found.group(2).decode("ascii")
        keys = [key for key in self.keys if key_id(key) == kid]
        if not keys:
            raise UnknownKey(
                f"{where}: sealed with key {kid}, which is not among the keys of {self.source}",
                hint="put the key that sealed it back into the key source (any line after "
                "the first), or check that the right key source is configured",
            )
        try:
            payload = base64.b64decode(found.group(3), validate=True)
        except binascii.Error:
            payload = b""
        if base64.b64encode(payload) != found.group(3):
            payload = b""  # only the canonical encoding: no bit of the envelope is free
        header = blob[: found.start(3)]
        from cryptography.exceptions import InvalidTag  # loaded by _aesgcm below anyway

        try:
            return _aesgcm(keys[0]).decrypt(
                payload[:NONCE_BYTES], payload[NONCE_BYTES:], header + account.encode("utf-8")
            )
        except (InvalidTag, ValueError):
            raise SealError(
                f"{where}: refused: it does not authenticate as account {account!r}'s sealed "
                "state (altered, or copied from another account)",
            ) from None


def _aesgcm(key: bytes) -> AESGCM:
    """
    AES-256-GCM with `key`. cryptography is loaded when a key is first used, not with
    this module: a daemon that seals nothing starts without it (docs/performance.md).
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def parse_keys(text: str, *, source: str) -> Keyring:
    """
    A Keyring from a key source's text: base64 keys of 32 bytes, one a line.

    Empty lines and lines starting with '#' are skipped. Messages name the source
    and the line, never what is on it.

    Raises:
        ConfigError: no key, or a line that is not base64 of 32 bytes.
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except binascii.Error:
            key = b""
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"{source}: line {number} is not a key (base64 of 32 random bytes)",
                hint="make one with: head -c 32 /dev/urandom | base64",
            )
        keys.append(key)
    if not keys:
        raise ConfigError(
            f"{source}: holds no key", hint="make one with: head -c 32 /dev/urandom | base64"
        )
    return Keyring(tuple(keys), source)


def load_keyring(
    key_file: Path | None,
    key_command: tuple[str, ...] | None,
    env: Mapping[str, str] | None = None,
) -> Keyring | None:
    """
    Read the configured key source ([store] encryption_key_file or _command); None if none.

    Raises:
        ConfigError: it cannot be read or run, or holds no valid key; names the source.
    """
    if key_file is not None:
        where = "[store] encryption_key_file"
        secret = SecretSource(file=key_file).read(where=where, env=env)
        source = f"{where} ({key_file})"
    elif key_command is not None:
        where = "[store] encryption_key_command"
        secret = SecretSource(command=key_command).read(where=where)
        source = f"{where} ({key_command[0]!r})"
    else:
        return None
    return parse_keys(secret.reveal(), source=source)
