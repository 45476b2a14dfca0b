"""
The op table (ops.OPS) against what reads it: the handlers, the access check, request.parse,
and docs/protocol.md (its operations table, its sections, its error codes and status names).
"""

from __future__ import annotations

import inspect
import os
import re
import socket
from pathlib import Path

import pytest
import trio
from conftest import in_process_daemon, make_config

from mailoauthd import __version__, errors, protocol
from mailoauthd.errors import ProtocolError
from mailoauthd.serve.handlers import Handlers
from mailoauthd.serve.ops import OPS, Access
from mailoauthd.serve.request import parse
from mailoauthd.testing import DevProvider

PROTOCOL_MD = Path(__file__).parent.parent / "docs" / "protocol.md"


def section(title: str) -> str:
    """The text of one `## title` section of docs/protocol.md."""
    text = PROTOCOL_MD.read_text("utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in `text` whose first cell is `code`, unquoted."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append([cells[0].strip("`"), *cells[1:]])
    return rows


class TestHandlers:
    @pytest.mark.parametrize("name", sorted(OPS))
    def test_every_row_names_a_handler_method(self, name: str) -> None:
        """The row's handler is a coroutine method; a conversation's takes the Channel too."""
        op = OPS[name]
        method = getattr(Handlers, op.handler)
        assert inspect.iscoroutinefunction(method)
        expected = ["self", "request", "peer", *(["channel"] if op.conversation else [])]
        assert list(inspect.signature(method).parameters) == expected


def ask(path: Path, request: dict[str, object]) -> dict[str, object]:
    """One request over the daemon's real socket, as any client would send it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(protocol.encode({"v": 1, **request}))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return protocol.decode(answer)


class TestServed:
    async def test_ping(self, tmp_path: Path, provider: DevProvider) -> None:
        """`ping` says which daemon answers."""
        async with in_process_daemon(make_config(tmp_path, provider)) as d:
            reply = await trio.to_thread.run_sync(ask, d.socket_path, {"op": "ping"})
        assert reply == {"ok": True, "version": __version__, "pid": os.getpid()}


class TestParse:
    @pytest.mark.parametrize("name", sorted(OPS))
    def test_what_a_row_requires(self, name: str) -> None:
        """An op is refused without the account or keys its row requires, and taken with them."""
        op = OPS[name]
        full = {"v": 1, "op": name, "account": "work", "refresh_token": "1//x"}
        assert parse(full).op == name
        for key in (*(["account"] if op.account else []), *op.requires):
            with pytest.raises(ProtocolError, match=key):
                parse({k: v for k, v in full.items() if k != key})

    def test_an_op_outside_the_table_is_refused(self) -> None:
        with pytest.raises(ProtocolError, match="unknown operation"):
            parse({"v": 1, "op": "shutdown"})


class TestDocs:
    def test_the_operations_table_is_the_op_table(self) -> None:
        """docs/protocol.md's table says what ops.OPS says, row for row."""
        yes = {True: "yes", False: "no"}
        documented = table_rows(section("Operations").split("\n### ")[0])
        assert documented == [
            [op.name, yes[op.account], op.access.value, yes[op.waits], yes[op.conversation]]
            for op in OPS.values()
        ]
        assert {access.value for access in Access} == {row[2] for row in documented}

    def test_every_operation_has_its_section(self) -> None:
        sections = re.findall(r"^### `([a-z_]+)`$", section("Operations"), re.MULTILINE)
        assert sorted(sections) == sorted(OPS)

    def test_the_error_codes_are_the_wire_codes(self) -> None:
        """Every code a reply may carry is documented, with the helper's exit status for it."""
        documented = {row[0]: row[2] for row in table_rows(section("Answers"))}
        assert set(documented) == errors.wire_codes()
        for code, exit_status in documented.items():
            assert int(exit_status) == errors.exit_code_for(code), code

    def test_the_status_names_are_protocol_status(self) -> None:
        row = next(r for r in table_rows(section("Operations")) if r[0] == "status" and len(r) == 3)
        documented = set(re.findall(r"`([a-z_]+)`", row[2]))
        names = {v for k, v in vars(protocol.Status).items() if k.isupper() and isinstance(v, str)}
        assert documented == names


def test_every_error_class_carries_a_code_from_errors() -> None:
    """However far from errors.py an error class lives, its code is one errors.py names."""
    import importlib
    import pkgutil

    import mailoauthd

    for module in pkgutil.walk_packages(mailoauthd.__path__, "mailoauthd."):
        importlib.import_module(module.name)

    def tree(kind: type[errors.MailoauthdError]) -> list[type[errors.MailoauthdError]]:
        return [kind, *(k for sub in kind.__subclasses__() for k in tree(sub))]

    helper_only = {errors.DaemonUnreachable.code, errors.StateLocked.code}
    classes = tree(errors.MailoauthdError)
    assert len(classes) > 20  # the walk found the classes outside errors.py
    for kind in classes:
        assert kind.code in errors.wire_codes() | helper_only, kind
