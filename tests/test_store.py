"""
Tests for mailoauthd.storage.store: the files backend sealed at rest, the key checks at start,
rekey.

The daemon and `mailoauthd rekey` run as real programs against the development provider.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailoauthd import config
from mailoauthd.errors import ConfigError, StateError
from mailoauthd.secret import Secret
from mailoauthd.storage import seal, state
from mailoauthd.storage.store import FilesStore, GrantStore, rekey
from mailoauthd.testing import DevProvider
from tests.conftest import MAILOAUTHD, USER, DaemonProcess, config_text, helper
from tests.test_state import ACCESS, REFRESH, full_state

Start = Callable[..., DaemonProcess]
NOW = datetime.now(UTC)


def new_key() -> bytes:
    return os.urandom(32)


def write_keys(path: Path, *keys: bytes) -> Path:
    path.write_text("".join(base64.b64encode(key).decode() + "\n" for key in keys))
    path.chmod(0o600)
    return path


def ring(*keys: bytes) -> seal.Keyring:
    return seal.Keyring(keys, "test")


def files(directory: Path) -> dict[str, bytes]:
    """Every state file's bytes (the lock file holds only a pid)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != ".lock"}


def grep(directory: Path, *needles: str) -> list[str]:
    """The files under `directory` that hold any of `needles`, as bytes."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and any(n.encode() in path.read_bytes() for n in needles):
            found.append(path.name)
    return found


def seed(directory: Path, keyring: seal.Keyring | None, grants: dict[str, str]) -> None:
    """Store imported refresh tokens, as `mailoauth import` would have."""
    store = FilesStore(directory, keyring)
    store.open()
    try:
        for name, token in grants.items():
            store.save(state.imported(name, Secret(token), NOW))
    finally:
        store.close()


def load(directory: Path, keyring: seal.Keyring | None, name: str) -> state.AccountState | None:
    store = FilesStore(directory, keyring)
    store.open()
    try:
        return store.load(name)
    finally:
        store.close()


def write_config(tmp: Path, provider: DevProvider, store_keys: str, **kw: object) -> Path:
    path = tmp / "config.toml"
    path.write_text(config_text(tmp, provider, **kw) + f"\n[store]\n{store_keys}\n")  # type: ignore[arg-type]
    return path


def mailoauthd(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILOAUTHD), "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


# --- the files backend, sealed --------------------------------------------------


class TestSealedFiles:
    def test_no_token_in_plain_text_in_the_state_directory(self, tmp_path: Path) -> None:
        for sealed in (False, True):
            directory = tmp_path / str(sealed)
            store = FilesStore(directory, ring(new_key()) if sealed else None)
            store.open()
            for name in ("work", "home"):
                store.save(full_state(account=name))
            assert store.load("home") == full_state(account="home")
            store.close()
        # Plain, the tokens are there to find: the search works.
        assert sorted(grep(tmp_path / "False", ACCESS, REFRESH)) == ["home.toml", "work.toml"]
        assert grep(tmp_path / "True", ACCESS, REFRESH) == []

    def test_files_stay_0600_and_whole(self, tmp_path: Path) -> None:
        store = FilesStore(tmp_path / "s", ring(new_key()))
        store.open()
        store.save(full_state())
        store.close()
        assert (tmp_path / "s" / "work.toml").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")] == []

    def test_a_blob_swapped_between_accounts_is_refused(self, tmp_path: Path) -> None:
        keys = ring(new_key())
        store = FilesStore(tmp_path, keys)
        store.open()
        store.save(full_state(account="work"))
        store.save(full_state(account="home", refresh_token=Secret("rt-home")))
        shutil.copy(tmp_path / "work.toml", tmp_path / "home.toml")
        store.check_keys()  # the key is right: only that account is refused
        with pytest.raises(seal.SealError, match=r"home\.toml.*another account"):
            store.load("home")
        assert store.load("work") == full_state(account="work")
        store.close()

    def test_plain_state_is_read_and_sealed_by_its_next_write(self, tmp_path: Path) -> None:
        plain = state.TokenStore(tmp_path)
        plain.open()
        plain.save(full_state())
        plain.close()
        store = FilesStore(tmp_path, ring(new_key()))
        store.open()
        assert store.load("work") == full_state()
        store.save(store.load("work"))  # type: ignore[arg-type]
        store.close()
        assert seal.is_sealed((tmp_path / "work.toml").read_bytes())
        assert grep(tmp_path, ACCESS, REFRESH) == []
        assert load(tmp_path, store.keyring, "work") == full_state()

    def test_check_keys_refuses_a_wrong_key_or_none(self, tmp_path: Path) -> None:
        seed(tmp_path, ring(new_key()), {"work": "rt-1"})
        for keyring, error in ((ring(new_key()), seal.UnknownKey), (None, seal.SealError)):
            store = FilesStore(tmp_path, keyring)
            store.open()
            with pytest.raises(error, match=r"work\.toml.*nothing was changed"):
                store.check_keys()
            store.close()

    def test_a_start_reads_each_file_once_and_never_serves_a_stale_copy(
        self, tmp_path: Path
    ) -> None:
        seed(tmp_path, ring(key := new_key()), {"work": "rt-1", "home": "rt-2", "gone": "rt-3"})
        store = FilesStore(tmp_path, ring(key))
        store.open()
        store.check_keys()
        (tmp_path / "work.toml").unlink()  # behind the lock's back: the copy read at start is used
        first = store.load("work")
        assert first is not None
        assert first.refresh_token == Secret("rt-1")
        assert store.load("work") is None  # only once: later loads read the file
        store.save(full_state(account="home"))
        assert store.load("home") == full_state(account="home")
        store.set_aside("gone", NOW)
        assert store.load("gone") is None
        store.close()

    def test_is_a_grant_store(self, tmp_path: Path) -> None:
        store: GrantStore = FilesStore(tmp_path)
        store.open()
        store.save(full_state(account="b"))
        store.save(full_state(account="a"))
        (tmp_path / "b.toml.corrupt-x").write_text("")
        assert store.accounts() == ["a", "b"]
        store.remove("a")
        assert store.accounts() == ["b"]
        assert store.load("a") is None
        store.close()


class TestRekey:
    def test_reseals_everything_with_the_first_key(self, tmp_path: Path) -> None:
        old, new = new_key(), new_key()
        seed(tmp_path, ring(old), {"work": "rt-work", "home": "rt-home"})
        store = FilesStore(tmp_path, ring(new, old))
        store.open()
        done = rekey(store)
        store.close()
        assert sorted(done.sealed) == ["home", "work"]
        assert done.failed == []
        for name in ("work", "home"):
            blob = (tmp_path / f"{name}.toml").read_bytes()
            assert seal.envelope_key(blob) == seal.key_id(new)
            loaded = load(tmp_path, ring(new), name)
            assert loaded is not None
            assert loaded.refresh_token == Secret(f"rt-{name}")

    def test_an_unreadable_grant_is_reported_and_kept(self, tmp_path: Path) -> None:
        key = new_key()
        seed(tmp_path, ring(key), {"work": "rt-work", "home": "rt-home"})
        shutil.copy(tmp_path / "work.toml", tmp_path / "home.toml")
        before = (tmp_path / "home.toml").read_bytes()
        store = FilesStore(tmp_path, ring(new_key(), key))
        store.open()
        done = rekey(store)
        store.close()
        assert done.sealed == ["work"]
        assert [type(e) for e in done.failed] == [seal.SealError]
        assert (tmp_path / "home.toml").read_bytes() == before


# --- the daemon and the command line ------------------------------------------------


class TestAtStart:
    @pytest.mark.integration
    @pytest.mark.parametrize("problem", ["wrong_key", "missing_key_file", "no_key"])
    def test_refused_with_the_key_source_named_and_state_untouched(
        self, tmp_path: Path, provider: DevProvider, problem: str
    ) -> None:
        seed(tmp_path / "state", ring(new_key()), {"work": provider.issue_refresh_token(USER)})
        key_file = write_keys(tmp_path / "mailoauthd.key", new_key())
        if problem == "missing_key_file":
            key_file.unlink()
        store_keys = "" if problem == "no_key" else f'encryption_key_file = "{key_file}"'
        path = write_config(tmp_path, provider, store_keys)
        before = files(tmp_path / "state")
        run = mailoauthd(path)
        assert run.returncode == 1, run.stderr
        if problem == "no_key":
            assert "work.toml: is sealed, but no encryption key is configured" in run.stderr
        else:
            assert "[store] encryption_key_file" in run.stderr
            assert str(key_file) in run.stderr
        if problem == "wrong_key":
            assert "work.toml: sealed with key" in run.stderr
            assert "nothing was changed" in run.stderr
        assert files(tmp_path / "state") == before
        assert not (tmp_path / "run" / "socket").exists()

    @pytest.mark.integration
    def test_check_config_reads_the_key_source(self, tmp_path: Path, provider: DevProvider) -> None:
        key_file = tmp_path / "mailoauthd.key"
        key_file.write_text("c2hvcnQ=\n")
        path = write_config(tmp_path, provider, f'encryption_key_file = "{key_file}"')
        run = mailoauthd(path, "check-config")
        assert run.returncode == 1
        assert f"[store] encryption_key_file ({key_file}): line 1 is not a key" in run.stderr
        assert "c2hvcnQ" not in run.stderr
        write_keys(key_file, new_key())
        assert mailoauthd(path, "check-config").returncode == 0


class TestDaemonSealed:
    def test_plain_state_is_sealed_on_first_write_and_nothing_is_lost(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        seed(tmp_path / "state", None, {"work": provider.issue_refresh_token(USER)})
        key = new_key()
        key_file = write_keys(tmp_path / "mailoauthd.key", key)
        path = write_config(tmp_path, provider, f'encryption_key_file = "{key_file}"')
        d = start_daemon(path)
        run = helper("token", "work", socket=d.socket)
        assert run.returncode == 0, run.stderr
        access = run.stdout.strip()
        assert d.stop() == 0
        blob = (tmp_path / "state" / "work.toml").read_bytes()
        assert seal.is_sealed(blob)
        stored = load(tmp_path / "state", ring(key), "work")
        assert stored is not None
        assert stored.access_token == Secret(access)
        assert stored.refresh_token is not None
        assert stored.refresh_token.reveal() in provider.valid_refresh_tokens(USER)
        assert grep(tmp_path / "state", access, stored.refresh_token.reveal()) == []
        assert access not in d.log()
        assert stored.refresh_token.reveal() not in d.log()

    def test_tampered_and_swapped_blobs_are_refused_reported_and_kept(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        key = new_key()
        names = ("work", "home", "spare")
        seed(tmp_path / "state", ring(key), {n: provider.issue_refresh_token(USER) for n in names})
        directory = tmp_path / "state"
        shutil.copy(directory / "work.toml", directory / "home.toml")  # swapped
        blob = bytearray((directory / "spare.toml").read_bytes())
        blob[-10] = ord("A") if blob[-10] != ord("A") else ord("B")  # tampered
        (directory / "spare.toml").write_bytes(bytes(blob))
        before = files(directory)
        key_file = write_keys(tmp_path / "mailoauthd.key", key)
        path = write_config(
            tmp_path, provider, f'encryption_key_file = "{key_file}"', accounts=names
        )
        d = start_daemon(path)
        assert helper("token", "work", socket=d.socket).returncode == 0
        for name in ("home", "spare"):
            run = helper("token", name, socket=d.socket)
            assert run.returncode != 0
            assert run.stdout == ""
            assert f"{name}.toml: refused" in run.stderr
        rows = {
            r["account"]: r
            for r in json.loads(helper("status", "--json", socket=d.socket).stdout)["accounts"]
        }
        assert rows["home"]["status"] == rows["spare"]["status"] == "state_error"
        assert "another account" in str(rows["home"]["last_error"])
        assert helper("refresh", "home", socket=d.socket).returncode != 0
        assert d.stop() == 0
        after = files(directory)
        assert after["home.toml"] == before["home.toml"]
        assert after["spare.toml"] == before["spare.toml"]
        unreadable = [e for e in d.events() if e.get("event") == "state.unreadable"]
        assert sorted(str(e["account"]) for e in unreadable) == ["home", "spare"]

    def test_rekey_with_two_keys_through_a_key_command(
        self, tmp_path: Path, provider: DevProvider, start_daemon: Start
    ) -> None:
        old, new = new_key(), new_key()
        grants = {n: provider.issue_refresh_token(USER) for n in ("work", "home")}
        seed(tmp_path / "state", ring(old), grants)
        key_file = write_keys(tmp_path / "keys", new, old)
        path = write_config(
            tmp_path,
            provider,
            f'encryption_key_command = ["cat", "{key_file}"]',
            accounts=("work", "home"),
        )
        run = mailoauthd(path, "rekey")
        assert run.returncode == 0, run.stderr
        assert f"2 grants sealed with key {seal.key_id(new)}" in run.stdout
        for name in grants:
            blob = (tmp_path / "state" / f"{name}.toml").read_bytes()
            assert seal.envelope_key(blob) == seal.key_id(new)
        write_keys(key_file, new)  # the old key retired
        d = start_daemon(path)
        for name in grants:
            assert helper("token", name, socket=d.socket).returncode == 0
        assert d.stop() == 0

    @pytest.mark.integration
    def test_rekey_without_a_key_is_refused(self, tmp_path: Path, provider: DevProvider) -> None:
        run = mailoauthd(write_config(tmp_path, provider, ""), "rekey")
        assert run.returncode == 1
        assert "[store]: no encryption_key_file or encryption_key_command" in run.stderr

    @pytest.mark.integration  # `mailoauthd rekey`
    def test_rekey_of_an_etcd_store_is_refused(self, tmp_path: Path, provider: DevProvider) -> None:
        key_file = write_keys(tmp_path / "keys", new_key())
        text = f'encryption_key_file = "{key_file}"\n{_ETCD}'
        run = mailoauthd(write_config(tmp_path, provider, text), "rekey")
        assert run.returncode == 1
        assert "rekey works on a state directory" in run.stderr


_ETCD = "backend = 'etcd'\nendpoints = ['https://10.0.0.1:2379', 'http://127.0.0.1:2379']"


class TestStoreConfig:
    def test_defaults(self) -> None:
        assert config.parse("", source="c").store == config.StoreSettings()

    def test_key_file_relative_to_the_config_or_a_variable(self) -> None:
        cfg = config.parse('[store]\nencryption_key_file = "k"\n', source="/etc/m/c.toml")
        assert cfg.store.encryption_key_file == Path("/etc/m/k")
        cfg = config.parse(
            '[store]\nencryption_key_file = "${CREDENTIALS_DIRECTORY}/k"\n', source="/etc/c"
        )
        assert cfg.store.encryption_key_file == Path("${CREDENTIALS_DIRECTORY}/k")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (
                'encryption_key_file = "k"\nencryption_key_command = ["x"]',
                "c: [store] encryption_key_command: set only one of",
            ),
            ('backend = "etcd"', "c: [store] endpoints: required with backend = 'etcd'"),
            ('backend = "s3"', "c: [store] backend:"),
            ('encryption_key = "x"', "c: [store] encryption_key: unknown key"),
            ('lease_ttl = "10s"', "c: [store] lease_ttl: is for backend = 'etcd' only"),
            (
                f"{_ETCD}\nlease_ttl = '1s'",
                "c: [store] lease_ttl: must be whole seconds, at least 2",
            ),
            (f"{_ETCD}\nlease_ttl = 2.5", "c: [store] lease_ttl: must be whole seconds"),
            ("backend = 'etcd'\nendpoints = []", "c: [store] endpoints: must be a non-empty list"),
            (
                "backend = 'etcd'\nendpoints = ['http://10.0.0.1:2379']",
                "c: [store] endpoints: must use https",
            ),
            (f"{_ETCD}\nprefix = 'mailoauthd'", "c: [store] prefix: must be a key prefix ending"),
            (f"{_ETCD}\ncert_file = 'c.pem'", "c: [store] key_file: required with cert_file"),
            (f"{_ETCD}\npassword_file = 'p'", "c: [store] username: required with password_file"),
        ],
    )
    def test_mistakes_name_the_table_and_key(self, text: str, message: str) -> None:
        with pytest.raises(ConfigError) as caught:
            config.parse(f"[store]\n{text}\n", source="c")
        assert message in caught.value.message

    def test_etcd_keys(self) -> None:
        cfg = config.parse(
            f"[store]\n{_ETCD}\nprefix = '/m/'\nca_file = 'ca.pem'\ncert_file = "
            "'${CREDENTIALS_DIRECTORY}/c.pem'\nkey_file = 'k.pem'\nusername = 'm'\n"
            "password_file = 'pw'\nlease_ttl = '3s'\n",
            source="/etc/m/c.toml",
        )
        st = cfg.store
        assert st.backend == "etcd"
        assert st.endpoints == ("https://10.0.0.1:2379", "http://127.0.0.1:2379")
        assert (st.prefix, st.username, st.lease_ttl) == ("/m/", "m", timedelta(seconds=3))
        assert st.ca_file == Path("/etc/m/ca.pem")
        assert st.cert_file == Path("${CREDENTIALS_DIRECTORY}/c.pem")
        assert (st.key_file, st.password_file) == (Path("/etc/m/k.pem"), Path("/etc/m/pw"))

    def test_round_trip(self) -> None:
        import tomli_w

        cfg = config.parse('[store]\nencryption_key_command = ["pass", "k"]\n', source="c")
        again = config.parse(tomli_w.dumps(config.to_mapping(cfg)), source="c")
        assert again.store == cfg.store


def test_state_error_is_what_the_scheduler_catches() -> None:
    assert issubclass(seal.SealError, StateError)
