"""
The development provider's HTTP vocabulary: a parsed request, an answer, an OAuth error.

Every endpoint module takes a `Request` and gives back a `Response`, or raises
`OAuthError` for an RFC 6749 §5.2 error answer; server.py turns them into bytes.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

MAX_BODY = 1 << 20


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(
        self, error: str, description: str, status: int = 400, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.headers = headers or {}
        self.reason: str | None = None  # why a client was refused, for Microsoft's wording

    def response(self) -> Response:
        body = {"error": self.error, "error_description": self.description}
        return json_response(body, self.status, self.headers)


def invalid_client(description: str, reason: str = "unknown_client") -> OAuthError:
    # RFC 6749 §5.2: 401 with a challenge, so Basic-capable clients know to retry.
    error = OAuthError(
        "invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="dev"'}
    )
    error.reason = reason
    return error


def json_response(
    value: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json", dict(headers or {}))


def page(status: int, title: str, body_html: str) -> Response:
    text = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    return Response(status, text.encode(), "text/html; charset=utf-8")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Request:
    def __init__(self, method: str, target: str, headers: Message, body: bytes) -> None:
        split = urlsplit(target)
        self.method, self.path, self.headers, self.body = method, split.path, headers, body
        self.is_form = (
            method == "POST" and headers.get_content_type() == "application/x-www-form-urlencoded"
        )
        source = body.decode("utf-8", "replace") if self.is_form else split.query
        self.params = parse_qs(source, keep_blank_values=True)

    def get(self, name: str) -> str | None:
        values = self.params.get(name)
        if values and len(values) > 1:
            raise OAuthError("invalid_request", f"parameter {name} given more than once")
        # RFC 6749 §3.1: a parameter without a value is as if omitted.
        return values[0] if values and values[0] else None

    def require(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise OAuthError("invalid_request", f"missing parameter {name}")
        return value

    def basic_auth(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            raise invalid_client("malformed Basic credentials") from None
        client_id, _, secret = decoded.partition(":")
        return client_id, secret

    def first(self, name: str) -> str | None:
        """For the record: never raises."""
        return self.params.get(name, [None])[0]

    def client_hint(self) -> str | None:
        try:
            basic = self.basic_auth()
        except OAuthError:
            basic = None
        return unquote_plus(basic[0]) if basic else self.first("client_id")

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body) if self.body else {}
        except ValueError as exc:
            raise ValueError(f"invalid JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("the JSON body must be an object")
        return value
