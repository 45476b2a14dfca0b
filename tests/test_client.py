"""The `mailoauth` helper: what it imports, what it prints, how it exits."""

from __future__ import annotations

import ast
import base64
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import MAILOAUTH

import mailoauthd.helper
from mailoauthd import protocol
from mailoauthd.helper import sasl

# Third-party packages the daemon uses; none may load in the helper.
THIRD_PARTY = {"trio", "httpx", "structlog", "sdnotify", "tomli_w", "anyio", "idna", "sniffio"}
# Standard-library modules that each cost a visible share of the helper's
# start-up; the hot path avoids them on purpose.
HEAVY_STDLIB = {"json", "argparse", "pathlib", "socket", "typing", "re", "enum", "dataclasses"}


def imported_by(args: list[str], tmp_path: Path) -> set[str]:
    """Run the installed helper under -X importtime and collect what it imported."""
    baseline = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        check=False,
    )
    run = subprocess.run(
        [sys.executable, "-X", "importtime", str(MAILOAUTH), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )

    def names(stderr: str) -> set[str]:
        found = set()
        for line in stderr.splitlines():
            if line.startswith("import time:") and "|" in line:
                found.add(line.rsplit("|", 1)[1].strip())
        return found

    return names(run.stderr) - names(baseline.stderr)


class TestImports:
    @pytest.mark.integration  # ,
    @pytest.mark.parametrize("command", ["token", "sasl"])
    def test_hot_path_imports_nothing_heavy(self, command: str, tmp_path: Path) -> None:
        """`mailoauth token|sasl` loads no third-party module and none of the costly stdlib ones."""
        extra = imported_by(["--socket", str(tmp_path / "none"), command, "work"], tmp_path)
        assert "mailoauthd.helper.token" in extra  # the measurement works
        top = {name.split(".")[0] for name in extra}
        assert not top & THIRD_PARTY
        assert not extra & HEAVY_STDLIB, extra

    @pytest.mark.integration  # the real helper, run with -X importtime
    def test_a_token_handed_out_loads_no_error_classes(self, tmp_path: Path) -> None:
        """On success `mailoauth token` does not even load errors.py (its classes cost a
        visible share of start-up; fastpath.py, which it does load, is paid for so)."""
        path = tmp_path / "s"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen()
            listener.settimeout(30)

            def answer() -> None:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(protocol.encode({"ok": True, "token": "tok", "username": ""}))

            thread = threading.Thread(target=answer)
            thread.start()
            extra = imported_by(["--socket", str(path), "token", "work"], tmp_path)
            thread.join(30)
        assert {"mailoauthd.helper.token", "mailoauthd.fastpath"} <= extra  # it ran
        assert "mailoauthd.errors" not in extra

    @pytest.mark.integration  # ,
    def test_only_stdlib_in_helper_modules(self) -> None:
        """Every module the helper can reach imports only the standard library."""
        # What the interpreter loaded before us (site hooks, an editable
        # install's finder) is not the helper's doing.
        code = (
            "import sys, pkgutil, importlib, mailoauthd.helper as h; before = set(sys.modules); "
            "[importlib.import_module(m.name)"
            " for m in pkgutil.iter_modules(h.__path__, h.__name__ + '.')]; "
            "print(sorted(n for n in set(sys.modules) - before"
            " if n.split('.')[0] not in sys.stdlib_module_names"
            " and not n.startswith('mailoauthd')))"
        )
        out = subprocess.run(
            [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

    def test_helper_package_imports_stdlib_and_itself(self) -> None:
        """Every import in mailoauthd/helper/, lazy ones included, is the standard library,
        the helper itself, or a shared bottom module that is itself standard library only."""
        helper = Path(mailoauthd.helper.__file__).parent
        bottom = helper.parent
        found = {f"mailoauthd.helper.{p.stem}": imports_in(p) for p in helper.glob("*.py")}
        assert len(found) > 5  # the walk works
        for name in SHARED:
            found[name] = imports_in(bottom / f"{name.split('.')[1]}.py")
        for module, names in found.items():
            for name in names:
                top = name.split(".")[0]
                allowed = (
                    top in sys.stdlib_module_names
                    or top == "__future__"
                    or name == "mailoauthd"  # its __init__: __version__ only
                    or name == "mailoauthd.helper"
                    or name.startswith("mailoauthd.helper.")
                    or name in SHARED
                )
                assert allowed, f"{module} imports {name}"
        assert imports_in(bottom / "__init__.py") == set()

    def test_quick_path_modules_skip_the_future_import(self) -> None:
        """The modules `mailoauth token` loads do without `from __future__ import annotations`:
        outside an editable install nothing else loads `__future__`, a visible share of the
        helper's start-up."""
        root = Path(mailoauthd.helper.__file__).parent.parent
        for name in QUICK_PATH:
            assert "__future__" not in imports_in(root / name), name


# What `mailoauth token` imports of ours (bin/mailoauth -> helper.token).
QUICK_PATH = (
    "__init__.py",
    "helper/__init__.py",
    "helper/token.py",
    "helper/transport.py",
    "errors.py",
    "protocol.py",
    "fastpath.py",
    "paths.py",
)
# The stdlib-only modules below the helper that it shares with the daemon.
SHARED = {
    "mailoauthd.errors",
    "mailoauthd.protocol",
    "mailoauthd.fastpath",
    "mailoauthd.paths",
    "mailoauthd.shared_files",
    "mailoauthd.hostport",
    "mailoauthd.flows",
}


def imports_in(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it; `from mailoauthd import x` counts as
    mailoauthd.x (a module) or mailoauthd (a name such as __version__)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            base = node.module or ""
            for alias in node.names:
                if base == "mailoauthd" and alias.name != "__version__":
                    names.add(f"mailoauthd.{alias.name}")
                else:
                    names.add(base)
    return names


@pytest.mark.integration  # ,  # the helper's exit codes
class TestUnreachable:
    def test_missing_socket_exits_3_and_names_the_path(self, tmp_path: Path) -> None:
        """With no daemon, the helper exits 3 and says which socket it tried."""
        socket = tmp_path / "nowhere" / "socket"
        run = subprocess.run(
            [str(MAILOAUTH), "--socket", str(socket), "token", "work"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 3
        assert run.stdout == ""
        assert str(socket) in run.stderr
        assert run.stderr.count("\n") == 1

    @pytest.mark.parametrize(
        "args",
        [
            ["token"],
            ["token", "a", "b"],
            ["token", "work", "--timeout", "soon"],
            ["token", "work", "--bogus", "1"],
            ["sasl", "work", "--mechanism", "plain"],
        ],
    )
    def test_usage_errors_exit_2(self, args: list[str], tmp_path: Path) -> None:
        """Wrong arguments exit 2 without touching the daemon."""
        run = subprocess.run(
            [str(MAILOAUTH), "--socket", str(tmp_path / "s"), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 2, run.stderr
        assert run.stdout == ""


class TestSasl:
    def test_xoauth2(self) -> None:
        """XOAUTH2 is user=U^Aauth=Bearer T^A^A, base64-encoded."""
        out = sasl.sasl_response("alice@example.com", "tok", mechanism="xoauth2")
        assert base64.b64decode(out) == b"user=alice@example.com\x01auth=Bearer tok\x01\x01"

    def test_oauthbearer_with_host_and_port(self) -> None:
        """OAUTHBEARER follows RFC 7628, escaping ',' and '=' in the authzid."""
        out = sasl.sasl_response(
            "a,b=c@example.com", "tok", mechanism="oauthbearer", host="imap.example.com", port="993"
        )
        assert base64.b64decode(out) == (
            b"n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01"
            b"auth=Bearer tok\x01\x01"
        )


class TestWire:
    def test_token_request_round_trips(self) -> None:
        """The hand-built hot-path request is valid JSON with the fields the daemon reads."""
        line = protocol.encode_token_request('wo"rk\u00e9', min_validity=60, timeout=15)
        assert line.endswith(b"\n")
        assert protocol.decode(line) == {
            "v": 1,
            "op": "token",
            "account": 'wo"rk\u00e9',
            "min_validity": 60.0,
            "timeout": 15.0,
        }

    @pytest.mark.parametrize(
        "raw", [b"", b"\xff\xfe", b"[1,2]", b'{"a":1} x', b"{", b'{"a":NaN}', b"null"]
    )
    def test_decode_rejects_what_is_not_one_object(self, raw: bytes) -> None:
        """Anything but one JSON object is a WireError."""
        with pytest.raises(protocol.WireError):
            protocol.decode(raw)
