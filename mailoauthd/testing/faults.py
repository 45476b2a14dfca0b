"""
Scripted faults of the development provider: the next requests on a path fail as told.

`DevProvider.add_fault(kind, count=, path=, **params)` queues them: HTTP errors
("status"), hangs, delays, connection resets, HTML error pages, broken JSON, and
answers without an access token. server.py's dispatch takes them in order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailoauthd.testing.wire import Response, json_response

# Fault kind -> the parameters it takes; anything else is a typo worth an error.
FAULT_KINDS: Mapping[str, frozenset[str]] = {
    "status": frozenset({"status", "body", "headers", "error", "error_description"}),
    "hang": frozenset({"seconds"}),
    "delay": frozenset({"seconds"}),
    "reset": frozenset(),
    "html": frozenset({"status"}),
    "malformed": frozenset(),
    "no_access_token": frozenset(),
}
_STATUS_ERRORS = {401: "invalid_client", 403: "access_denied", 429: "temporarily_unavailable"}
_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
    b"<body><h1>Sorry, something went wrong.</h1><p>Please try again later.</p></body></html>"
)


@dataclass(eq=False)
class Fault:
    kind: str
    path: str
    remaining: int
    params: dict[str, Any]


def checked(kind: str, count: int, path: str, params: dict[str, Any]) -> Fault:
    """The fault `add_fault` was asked for, or ValueError naming what is wrong with it."""
    allowed = FAULT_KINDS.get(kind)
    if allowed is None:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    if unknown := set(params) - allowed:
        raise ValueError(f"fault {kind!r} takes no {', '.join(sorted(unknown))}")
    if not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("/admin/"):
        raise ValueError("path must be a provider path like /token (never /admin/...)")
    status = params.get("status", 500)
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    seconds = params.get("seconds", 0.0)
    if not isinstance(seconds, int | float) or not seconds >= 0:
        raise ValueError("seconds must be a number >= 0")
    headers = params.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError("headers must map strings to strings")
    return Fault(kind, path, count, dict(params))


def fault_response(fault: Fault, access_token_lifetime: float) -> Response:
    """The answer of a fault that has one (not hang, delay or reset)."""
    params = fault.params
    if fault.kind == "status":
        status = params.get("status", 500)
        headers = dict(params.get("headers", {}))
        content_type = "application/json"
        for name in [n for n in headers if n.lower() == "content-type"]:
            content_type = headers.pop(name)
        if "body" in params:
            return Response(status, str(params["body"]).encode(), content_type, headers)
        default = _STATUS_ERRORS.get(status, "server_error" if status >= 500 else "invalid_request")
        body = {"error": params.get("error", default)}
        if "error_description" in params:
            body["error_description"] = params["error_description"]
        return Response(status, json.dumps(body).encode(), content_type, headers)
    if fault.kind == "html":
        return Response(params.get("status", 500), _ERROR_PAGE, "text/html; charset=utf-8")
    if fault.kind == "malformed":
        return Response(200, b'{"access_token": "eyJ0eXAiOiJKV1QiLCJub25jZSI6', "application/json")
    expires_in = int(access_token_lifetime)
    return json_response({"token_type": "Bearer", "expires_in": expires_in, "scope": "mail"})
