"""
CPython's private APIs used for speed, in one place, each with a public fallback.

Standard library only, and cheap to import: the helper loads it on every mail
connection (through protocol.py and helper/transport.py). Three things are
taken from CPython's C modules because the public way costs a visible share of
a quick answer (docs/performance.md):

- `json_scanner`: `_json.make_scanner`, the C scanner `json` is built on,
  without importing the `json` package; `quote` is its string encoder.
- `sockets`: the C module `_socket`, whose `socket` class has everything the
  helper uses, without importing `socket` (and with it `enum` and `selectors`).
- `accept_fd`: `socket._accept()`, which returns the new descriptor without
  building a Python `socket.socket` (its constructor and close() show up in the
  daemon's accept loop).

Where a private name is missing (another interpreter, a future CPython), the
public equivalent is used instead: `json.scanner.py_make_scanner`,
`json.encoder.py_encode_basestring_ascii`, `socket`, and `socket.accept()`.
The fallbacks are chosen once, at import, and tests/test_fastpath.py runs
them (`portable_*`) and the helper with `_json` and `_socket` hidden.
"""

# mypy reads `if TYPE_CHECKING:` as true whatever defines the name; importing
# it from typing would cost the helper a module it does not otherwise load.
TYPE_CHECKING = False
__all__ = [
    "accept_fd",
    "json_scanner",
    "portable_accept_fd",
    "portable_json_scanner",
    "portable_quote",
    "quote",
    "sockets",
]
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    Scanner = Callable[[str, int], tuple[object, int]]

try:
    import _socket as sockets  # the C module behind `socket`
except ImportError:  # pragma: no cover - CPython always has it; tests hide it in a subprocess
    import socket as sockets  # type: ignore[no-redef]

try:
    import _json
except ImportError:
    _json = None  # type: ignore[assignment]


def _reject_constant(name: str) -> float:
    """NaN and Infinity are not JSON: a line that holds them is refused."""
    raise ValueError(f"{name} is not allowed")


class _ScanContext:
    """What `_json.make_scanner` reads off a JSONDecoder, without importing json."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: "dict[str, str]" = {}
    parse_constant = staticmethod(_reject_constant)


def portable_json_scanner() -> "Scanner":
    """The pure-Python scanner, with the same rules as the C one; imports json."""
    from json import JSONDecoder, scanner

    # Public, though typeshed does not list it: `json` falls back to it itself.
    make = scanner.py_make_scanner  # type: ignore[attr-defined]
    return make(JSONDecoder(parse_constant=_reject_constant))  # type: ignore[no-any-return]


def json_scanner() -> "Scanner":
    """
    scan(text, index) -> (value, end): one JSON value, strictly (no NaN, no Infinity).

    Raises (from the scanner):
        StopIteration, ValueError, RecursionError: not valid JSON at `index`.
    """
    if _json is None:
        return portable_json_scanner()
    return _json.make_scanner(_ScanContext())  # type: ignore[arg-type]


def portable_quote(text: str) -> str:
    """A JSON string literal, ASCII only; the pure-Python encoder (imports json)."""
    from json.encoder import py_encode_basestring_ascii

    return py_encode_basestring_ascii(text)


quote: "Callable[[str], str]" = portable_quote if _json is None else _json.encode_basestring_ascii


def portable_accept_fd(listener: "socket.socket") -> int:
    """A new connection's descriptor through the public accept(); the caller owns it."""
    conn, _ = listener.accept()
    return conn.detach()


def _private_accept_fd(listener: "socket.socket") -> int:
    """A new connection's descriptor, without a Python socket object in between."""
    fd, _ = listener._accept()  # type: ignore[attr-defined]  # CPython's, untyped
    return fd  # type: ignore[no-any-return]


# Raises BlockingIOError on a non-blocking listener with nobody waiting, OSError
# (EMFILE …) when the connection cannot be taken.
accept_fd: "Callable[[socket.socket], int]" = (
    _private_accept_fd if hasattr(sockets.socket, "_accept") else portable_accept_fd
)
