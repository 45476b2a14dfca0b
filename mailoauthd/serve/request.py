"""
A request from the socket, checked once at the boundary and typed.

`protocol.decode` turns a line into a JSON object; `parse` turns that object
into a `Request` or refuses it with ProtocolError (`bad-request`). Both paths
of the server (the quick answer in the accept loop, and the general handler)
and the access gate take the same `Request`, so what one accepts the other
cannot refuse, and no ill-typed, huge or unbounded value gets past here:

- `v` is the number 1; `op` is a row of ops.OPS, and the keys its row
  requires (`account`, `refresh_token`) are there.
- `account` is a name as the configuration allows them (config.NAME_PATTERN):
  anything else cannot name an account, and would only be logged or echoed.
- `min_validity`, `timeout` and `wait` are finite numbers of seconds (JSON
  numbers, not booleans) within ±MAX_SECONDS; an integer of any length is
  refused without being converted to a float (that would raise OverflowError).
- `refresh_token` is a non-empty string of at most MAX_TOKEN characters;
  `flow` a string of at most MAX_WORD characters, `client_id` of at most
  MAX_CLIENT_ID.

Keys the daemon does not know are ignored, as before (a newer helper may send
more). Known keys are checked whatever the operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from mailoauthd.config import NAME_PATTERN
from mailoauthd.errors import ProtocolError
from mailoauthd.secret import Secret
from mailoauthd.serve.ops import OPS

# About 31 years: beyond any wait or validity anyone means, far inside a float's range.
MAX_SECONDS = 1e9
# A refresh token is at most a few KiB at any provider we know; the line is 64 KiB anyway.
MAX_TOKEN = 16 * 1024
MAX_WORD = 64
# Client IDs are GUIDs at Microsoft and under 100 characters at Google.
MAX_CLIENT_ID = 512
# config.NAME_PATTERN allows 64 characters; anything longer is refused before the regex.
NAME_PATTERN_MAX = 64
# The keys of the helper's token request (protocol.encode_token_request): a request
# with no others has no strings but its account to check.
_USUAL = frozenset({"v", "op", "account", "min_validity", "timeout", "wait"})
# Names that matched NAME_PATTERN, so that the next request for one costs a set lookup, not
# a regex; bounded, so that a peer sending made-up names cannot grow it without end.
_NAMES: set[str] = set()
MAX_NAMES_KEPT = 4096
# A Request with every field given, without the keyword handling of its constructor.
_tuple_new = tuple.__new__


class Request(NamedTuple):
    """
    One checked request. Numbers left out are None: each operation has its own default.

    A named tuple rather than a frozen dataclass: as immutable, and made in a
    third of the time, on the path every mail connection takes (docs/performance.md).
    """

    op: str
    account: str | None = None
    min_validity: float | None = None
    timeout: float | None = None
    wait: float | None = None
    refresh_token: Secret | None = None
    flow: str | None = None
    client_id: str | None = None  # `import --from`: the client the other tool's token is for

    @property
    def name(self) -> str:
        """The account, for operations that need one (parse made sure it is there)."""
        assert self.account is not None, self.op
        return self.account


def shown(value: object, limit: int = 40) -> str:
    """A value from a request as it may appear in an answer or the log: escaped and bounded."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def _seconds(raw: Mapping[str, object], key: str) -> float | None:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"'{key}' must be a number of seconds")
    # Compared before any conversion: float() of a 400-digit integer raises OverflowError.
    if not -MAX_SECONDS <= value <= MAX_SECONDS:  # also false for NaN
        raise ProtocolError(f"'{key}' must be a number of seconds within ±{MAX_SECONDS:g}")
    return float(value)


def _string(raw: Mapping[str, object], key: str, limit: int) -> str | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"'{key}' must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(f"'{key}' is longer than {limit} characters")
    return value


def parse(raw: Mapping[str, object]) -> Request:
    """
    Check a decoded request line and type it.

    Raises:
        ProtocolError: a wrong version, operation, type, range or size; the
            message names the key and never echoes more than a short, escaped
            excerpt of what was sent.
    """
    version = raw.get("v")
    if isinstance(version, bool) or version != 1:
        raise ProtocolError(f"unsupported protocol version {shown(version)}; expected 1")
    op = raw.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown operation {shown(op)}")
    rules = OPS[op]
    account = _string(raw, "account", NAME_PATTERN_MAX)
    if account is not None and account not in _NAMES:
        if not NAME_PATTERN.fullmatch(account):
            raise ProtocolError(f"'account' is not an account name: {shown(account)}")
        if len(_NAMES) < MAX_NAMES_KEPT:
            _NAMES.add(account)
    if account is None and rules.account:
        raise ProtocolError("'account' must be a non-empty string")
    for key in rules.requires:
        if key not in raw:
            raise ProtocolError(f"'{key}' must be a non-empty string")
    if raw.keys() <= _USUAL:  # a mail program's token request: the checks it needs, and no more
        return _tuple_new(
            Request,
            (
                op,
                account,
                _seconds(raw, "min_validity"),
                _seconds(raw, "timeout"),
                _seconds(raw, "wait"),
                None,
                None,
                None,
            ),
        )
    token = _string(raw, "refresh_token", MAX_TOKEN)
    flow = raw.get("flow")
    return Request(
        op,
        account,
        _seconds(raw, "min_validity"),
        _seconds(raw, "timeout"),
        _seconds(raw, "wait"),
        None if token is None else Secret(token),
        # An empty or null flow means the account's own, as before.
        None if flow is None or flow == "" else _string(raw, "flow", MAX_WORD),
        _string(raw, "client_id", MAX_CLIENT_ID),
    )
