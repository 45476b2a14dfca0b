"""
Tests for mailoauthd.storage.seal: the envelope, its binding to an account, keys and key
sources.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailoauthd.errors import ConfigError, StateError
from mailoauthd.storage import seal

PLAIN = b'version = 1\naccount = "work"\nrefresh_token = "rt-77b2e0-do-not-print"\n'


def new_key() -> bytes:
    return os.urandom(32)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


KEY = new_key()
OLD_KEY = new_key()
RING = seal.Keyring((KEY,), "test keys")


class TestEnvelope:
    def test_round_trip(self) -> None:
        blob = RING.seal("work", PLAIN)
        assert RING.open("work", blob, where="x") == PLAIN

    def test_is_one_versioned_ascii_line_without_the_plaintext(self) -> None:
        blob = RING.seal("work", PLAIN)
        assert blob.startswith(b"mailoauthd-sealed v1 " + seal.key_id(KEY).encode() + b" ")
        assert blob.endswith(b"\n")
        assert blob.count(b"\n") == 1
        blob.decode("ascii")
        assert b"rt-77b2e0" not in blob
        assert b"work" not in blob
        assert seal.is_sealed(blob)
        assert not seal.is_sealed(PLAIN)
        assert seal.envelope_key(blob) == seal.key_id(KEY)

    def test_every_seal_has_a_new_nonce(self) -> None:
        assert RING.seal("work", PLAIN) != RING.seal("work", PLAIN)

    def test_a_blob_swapped_between_accounts_is_refused(self) -> None:
        blob = RING.seal("work", PLAIN)
        with pytest.raises(seal.SealError, match="another account") as caught:
            RING.open("home", blob, where="/state/home.toml")
        assert "/state/home.toml" in caught.value.message
        assert isinstance(caught.value, StateError)

    def test_an_unknown_key_is_named_with_the_key_source(self) -> None:
        blob = seal.Keyring((OLD_KEY,), "old").seal("work", PLAIN)
        with pytest.raises(seal.UnknownKey) as caught:
            RING.open("work", blob, where="/state/work.toml")
        assert seal.key_id(OLD_KEY) in caught.value.message
        assert "test keys" in caught.value.message

    def test_a_later_envelope_version_is_refused_not_guessed(self) -> None:
        blob = RING.seal("work", PLAIN).replace(b" v1 ", b" v2 ", 1)
        with pytest.raises(seal.SealError, match="envelope v2"):
            RING.open("work", blob, where="x")

    def test_keys_never_show_in_repr(self) -> None:
        assert b64(KEY) not in repr(RING)
        assert repr(KEY) not in repr(RING)


class TestHostileBlobs:
    """Whatever is done to a sealed blob, it is refused, never opened to something else."""

    @given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
    def test_any_flipped_bit_is_refused(self, position: int, bit: int) -> None:
        blob = bytearray(RING.seal("work", PLAIN))
        position %= len(blob) - 1  # the final newline is optional
        blob[position] ^= 1 << bit
        with pytest.raises(seal.SealError):
            RING.open("work", bytes(blob), where="x")

    def test_the_unused_bits_of_the_last_base64_digit_are_not_free(self) -> None:
        # 98 bytes of payload: the last digit before '=' carries 2 unused bits, which a
        # lenient decoder ignores. Flipping one must not leave an envelope that opens.
        blob = RING.seal("work", PLAIN)
        assert (len(PLAIN) + 28) % 3 == 2
        digits = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        at = len(blob.rstrip(b"=\n")) - 1
        for bit in (0, 1):
            altered = bytearray(blob)
            altered[at] = digits[digits.index(blob[at]) ^ (1 << bit)]
            assert base64.b64decode(bytes(altered).split()[3]) == base64.b64decode(blob.split()[3])
            with pytest.raises(seal.SealError):
                RING.open("work", bytes(altered), where="x")

    @given(cut=st.integers(min_value=1))
    def test_any_truncation_is_refused(self, cut: int) -> None:
        blob = RING.seal("work", PLAIN).rstrip(b"\n")
        with pytest.raises(seal.SealError):
            RING.open("work", blob[: cut % len(blob)], where="x")

    @given(junk=st.binary())
    def test_any_bytes_are_refused_with_our_error(self, junk: bytes) -> None:
        with pytest.raises(seal.SealError):
            RING.open("work", junk, where="x")

    @given(account=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))
    def test_only_the_account_sealed_for_opens_it(self, account: str) -> None:
        blob = RING.seal("work", PLAIN)
        if account == "work":
            assert RING.open(account, blob, where="x") == PLAIN
        else:
            with pytest.raises(seal.SealError):
                RING.open(account, blob, where="x")


class TestRotation:
    def test_first_key_seals_and_every_key_opens(self) -> None:
        old_blob = seal.Keyring((OLD_KEY,), "old").seal("work", PLAIN)
        ring = seal.Keyring((KEY, OLD_KEY), "both")
        assert ring.open("work", old_blob, where="x") == PLAIN
        new_blob = ring.seal("work", PLAIN)
        assert seal.envelope_key(new_blob) == seal.key_id(KEY) == ring.sealing_id
        assert RING.open("work", new_blob, where="x") == PLAIN


class TestKeySource:
    def test_keys_one_a_line_comments_and_blank_lines_skipped(self) -> None:
        ring = seal.parse_keys(f"# new\n{b64(KEY)}\n\n  {b64(OLD_KEY)}  \n", source="src")
        assert ring.keys == (KEY, OLD_KEY)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "# nothing\n",
            "not-base64!\n",
            base64.b64encode(b"short").decode() + "\n",
            base64.b64encode(b"x" * 33).decode() + "\n",
        ],
    )
    def test_bad_key_source_names_source_and_line_not_content(self, text: str) -> None:
        with pytest.raises(ConfigError) as caught:
            seal.parse_keys(text, source="[store] encryption_key_file (/k)")
        assert "[store] encryption_key_file (/k)" in caught.value.message
        for line in text.split():
            if line != "#":
                assert line not in caught.value.message + (caught.value.hint or "")

    def test_key_file_with_credentials_directory(self, tmp_path: Path) -> None:
        (tmp_path / "mailoauthd.key").write_text(b64(KEY) + "\n")
        ring = seal.load_keyring(
            Path("${CREDENTIALS_DIRECTORY}/mailoauthd.key"),
            None,
            {"CREDENTIALS_DIRECTORY": str(tmp_path)},
        )
        assert ring is not None
        assert ring.keys == (KEY,)
        assert "encryption_key_file" in ring.source

    def test_key_file_without_credentials_directory_says_why(self) -> None:
        with pytest.raises(ConfigError, match="LoadCredential"):
            seal.load_keyring(Path("${CREDENTIALS_DIRECTORY}/mailoauthd.key"), None, {})

    def test_missing_key_file_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"encryption_key_file.*cannot read.*nokey"):
            seal.load_keyring(tmp_path / "nokey", None, {})

    @pytest.mark.integration
    def test_key_command(self, tmp_path: Path) -> None:
        (tmp_path / "k").write_text(f"{b64(KEY)}\n{b64(OLD_KEY)}\n")
        ring = seal.load_keyring(None, ("cat", str(tmp_path / "k")))
        assert ring is not None
        assert ring.keys == (KEY, OLD_KEY)
        assert "encryption_key_command ('cat')" in ring.source

    @pytest.mark.integration
    def test_failing_key_command_is_named(self) -> None:
        with pytest.raises(ConfigError, match=r"encryption_key_command.*'false'.*status 1"):
            seal.load_keyring(None, ("false",))

    def test_no_key_source_no_keyring(self) -> None:
        assert seal.load_keyring(None, None) is None


@pytest.mark.integration
def test_helper_path_never_loads_sealing() -> None:
    """`mailoauth token` never touches state: neither seal, store nor cryptography is loaded."""
    report = (
        "print(sorted(n for n in sys.modules if n.startswith(('cryptography', 'mailoauthd.s'))))"
    )

    def loaded(imports: str) -> str:
        code = f"import sys, {imports}; {report}"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.strip()

    assert (
        loaded("mailoauthd.helper.token, mailoauthd.helper.commands, mailoauthd.protocol") == "[]"
    )
    # The check sees sealing when it is there: the daemon's side loads it.
    assert "'mailoauthd.storage.seal'" in loaded("mailoauthd.storage.store")
