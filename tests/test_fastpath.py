"""
fastpath.py: CPython's private APIs and their public fallbacks behave alike, and the helper
works on the fallbacks alone (`_json` and `_socket` hidden, as on an interpreter without them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import MAILOAUTH
from hypothesis import given
from hypothesis import strategies as st

from mailoauthd import fastpath, protocol

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
FAST = fastpath.json_scanner()
PORTABLE = fastpath.portable_json_scanner()


def scanned(scan: fastpath.Scanner, text: str) -> tuple[str, object]:
    """What a scanner makes of `text`: its value and end, or the kind of refusal."""
    try:
        return "ok", scan(text, 0)
    except (StopIteration, ValueError, RecursionError) as exc:
        return "refused", type(exc).__name__


class TestScanner:
    @given(value=json_values)
    def test_same_values_as_the_c_scanner(self, value: object) -> None:
        """Valid JSON: both give the same value and end."""
        text = json.dumps(value)
        assert scanned(PORTABLE, text) == scanned(FAST, text)
        assert scanned(PORTABLE, text)[1] == (value, len(text))

    @given(text=st.text(max_size=30))
    def test_same_refusals(self, text: str) -> None:
        """Any text: both accept it or both refuse it."""
        assert scanned(PORTABLE, text)[0] == scanned(FAST, text)[0]

    @pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": NaN}'])
    def test_no_constants(self, text: str) -> None:
        """NaN and Infinity are not JSON: both refuse them."""
        assert scanned(PORTABLE, text)[0] == scanned(FAST, text)[0] == "refused"

    @given(text=st.text(max_size=30))
    def test_quote(self, text: str) -> None:
        """The pure-Python string encoder writes what the C one writes."""
        assert fastpath.portable_quote(text) == fastpath.quote(text)
        assert json.loads(fastpath.quote(text)) == text


class TestAccept:
    @pytest.mark.parametrize("accept", [fastpath.accept_fd, fastpath.portable_accept_fd])
    def test_a_connection_is_taken(self, accept: object, tmp_path: Path) -> None:
        """Either way, the descriptor is the new connection, ours to use and close."""
        assert callable(accept)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(tmp_path / "s"))
            listener.listen()
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                accept(listener)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(str(tmp_path / "s"))
                with socket.socket(fileno=accept(listener)) as conn:
                    client.sendall(b"ping\n")
                    assert conn.recv(16) == b"ping\n"

    def test_the_private_one_is_chosen_on_cpython(self) -> None:
        """On CPython the fast path really is taken (else the speed claims are void)."""
        assert fastpath.accept_fd is not fastpath.portable_accept_fd
        assert fastpath.quote is not fastpath.portable_quote
        assert fastpath.sockets.__name__ == "_socket"


HIDE = "import socket, sys; sys.modules['_json'] = None; sys.modules['_socket'] = None; "


@pytest.mark.integration  # fresh interpreters without _json and _socket
class TestWithoutPrivateModules:
    def test_fallbacks_are_chosen(self) -> None:
        """With `_json` and `_socket` missing, fastpath picks the public modules."""
        code = HIDE + (
            "import mailoauthd.fastpath as f; "
            "print(f.quote is f.portable_quote, f.sockets.__name__)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == ["True", "socket"]

    def test_the_helper_gets_a_token(self, tmp_path: Path) -> None:
        """`mailoauth token` on the fallbacks alone: its request line is right, and the
        daemon's answer is read. (A one-line stand-in answers: the helper is under test.)"""
        path = tmp_path / "s"
        received: list[bytes] = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen()
            listener.settimeout(30)

            def answer() -> None:
                conn, _ = listener.accept()
                with conn:
                    received.append(conn.recv(65536))
                    reply = {"ok": True, "token": "tok-é", "expires_at": 1, "username": "u"}
                    conn.sendall(protocol.encode(reply))

            thread = threading.Thread(target=answer)
            thread.start()
            code = HIDE + (
                "import runpy; "
                f"sys.argv = ['mailoauth', '--socket', {str(path)!r}, 'token', 'work']; "
                f"runpy.run_path({str(MAILOAUTH)!r}, run_name='__main__')"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
            )
            thread.join(30)
        assert (out.returncode, out.stdout, out.stderr) == (0, "tok-é\n", "")
        request = protocol.decode(received[0])
        assert (request["op"], request["account"]) == ("token", "work")
