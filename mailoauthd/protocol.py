"""
The wire format between `mailoauth` and the daemon. Standard library only.

One request per connection: the client sends one line of UTF-8 JSON (an
object with "v" and "op"), the daemon answers with one line and closes. Lines
are at most MAX_LINE bytes. docs/protocol.md describes every operation.

The helper is spawned once per mail connection, so this module avoids even
the `json` package: it uses the C scanner and string encoder that `json` itself
is built on, which cost nothing to import (fastpath.py, with a fallback).
"""

from mailoauthd import fastpath

VERSION = 1
MAX_LINE = 64 * 1024


class Status:
    """An account's status: in `status` rows, in state files, in `notify_command`'s event.

    The one home of these names, here at the bottom because the helper reads
    them too (`status --check`); a namespace, not an enum, which would cost the
    helper's start-up. The strings are API: never rename one.
    """

    OK = "ok"  # tokens present; refreshed on schedule
    NEEDS_AUTHORIZATION = "needs_authorization"  # no usable grant: a human must sign in
    MISCONFIGURED = "misconfigured"  # the provider refuses our client or request
    FAILING = "failing"  # transient failures; retrying with backoff
    STATE_ERROR = "state_error"  # rows only: the account's state file is unreadable
    # What a state file may hold (STATE_ERROR is never stored).
    STORED = (OK, NEEDS_AUTHORIZATION, MISCONFIGURED, FAILING)


_scan = fastpath.json_scanner()
quote = fastpath.quote


class WireError(ValueError):
    """A line that is not one JSON object."""


def decode(line: bytes) -> dict[str, object]:
    """
    Parse one line into a JSON object.

    Args:
        line: the bytes received, with or without the trailing newline.

    Raises:
        WireError: not UTF-8, not JSON, or not an object.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("not UTF-8") from exc
    text = text.strip(" \t\r\n")
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError, RecursionError) as exc:
        raise WireError("not valid JSON") from exc
    if end != len(text):
        raise WireError("trailing data after the JSON object")
    if not isinstance(value, dict):
        raise WireError("not a JSON object")
    return value


def encode_token_request(
    account: str, *, min_validity: float, timeout: float, wait: float = 0.0
) -> bytes:
    """The helper's hot-path request, built without the json package."""
    waiting = f',"wait":{float(wait)!r}' if wait > 0 else ""
    return (
        f'{{"v":{VERSION},"op":"token","account":{quote(account)},'
        f'"min_validity":{float(min_validity)!r},"timeout":{float(timeout)!r}{waiting}}}\n'
    ).encode("ascii")


# mypy reads `if TYPE_CHECKING:` as true whatever defines the name; importing
# it from typing would cost the helper a module it does not otherwise load.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import json

# Made on first use: the helper's hot path never encodes with json. One for the
# process, because json.dumps with separators makes a new encoder every call,
# a visible share of the daemon's quick answers (docs/performance.md).
_encoder: "json.JSONEncoder | None" = None


def encode(message: dict[str, object]) -> bytes:
    """Any message as one line; imports json, so not for the helper's hot path."""
    global _encoder
    if _encoder is None:
        import json

        _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
    return (_encoder.encode(message) + "\n").encode("ascii")


def error_reply(code: str, message: str, hint: str = "") -> dict[str, object]:
    """The daemon's answer for a failed request."""
    return {"ok": False, "error": code, "message": message, "hint": hint}
