"""fleetd's start-up errors: a TLS file that cannot be used, etcd that does not answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from mailoauthd import config
from mailoauthd.errors import ConfigError, StateError
from mailoauthd.storage import fleetd
from tests.fleet.cluster import free_port


def settings(tmp_path: Path, extra: str = "") -> config.StoreSettings:
    text = f"[store]\nbackend = 'etcd'\nendpoints = ['http://127.0.0.1:{free_port()}']\n{extra}"
    return config.parse(text, source=str(tmp_path / "c.toml")).store


async def test_a_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[store\] ca_file/cert_file/key_file: cannot be used"):
        await fleetd.open_store(settings(tmp_path, "ca_file = 'nowhere.pem'"), tmp_path, {})


async def test_an_unset_credentials_directory_is_named(tmp_path: Path) -> None:
    extra = "ca_file = '${CREDENTIALS_DIRECTORY}/ca.pem'"
    with pytest.raises(ConfigError, match=r"needs \$CREDENTIALS_DIRECTORY, which is not set"):
        await fleetd.open_store(settings(tmp_path, extra), tmp_path, {})


def test_etcd_that_does_not_answer_stops_the_start_naming_the_endpoints(tmp_path: Path) -> None:
    store = settings(tmp_path)

    async def start() -> None:
        await fleetd.open_store(store, tmp_path, {})

    with pytest.raises(StateError) as caught:
        trio.run(start, clock=trio.testing.MockClock(autojump_threshold=0))
    assert f"[store] etcd ({store.endpoints[0]}) did not answer within 30 s" in caught.value.message
    assert "etcd is unavailable" in caught.value.message
