"""
The one network exchange with a provider's endpoint: send a request, read its bounded body.

oauth.py builds requests and reads answers without I/O; this is the one place that
talks to the network for it (token, device, revocation and metadata endpoints), and
the one place where httpx's exceptions become ours: every failure to reach an
endpoint or to read its answer is a TransientGrantError, retried with backoff.
"""

from __future__ import annotations

import contextlib
import ssl

import httpx

from mailoauthd.errors import TransientGrantError
from mailoauthd.provider import provider_input


async def send(
    http: httpx.AsyncClient, request: httpx.Request, *, what: str = "the token endpoint"
) -> httpx.Response:
    """
    Send one request and read the body; network failures become TransientGrantError.

    The caller bounds the whole exchange with a cancel scope; httpx's own
    timeout is only a backstop.

    Args:
        http: the client.
        request: what to send.
        what: names the endpoint in messages, e.g. "the device authorization endpoint".
    """
    try:
        response = await http.send(request, stream=True)
        try:
            body = await _read_bounded(response, what)
        finally:
            await response.aclose()
    except httpx.TimeoutException as exc:
        raise TransientGrantError(f"{what} timed out ({request.url.host})") from exc
    except httpx.TransportError as exc:
        raise TransientGrantError(
            f"cannot reach {what} at {request.url.host}: {type(exc).__name__}"
            + (f": {provider_input.clean_text(exc)}" if str(exc) else "")
            + _tls_failure(exc)
        ) from exc
    except httpx.RequestError as exc:  # e.g. a body that cannot be decoded
        raise TransientGrantError(
            f"the answer of {what} at {request.url.host} could not be read: {type(exc).__name__}"
        ) from exc
    # The body as read (decoded), so the headers that described its encoding go.
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=body,
        request=request,
        extensions={"reason_phrase": response.reason_phrase.encode("latin-1", "replace")},
    )


async def _read_bounded(response: httpx.Response, what: str) -> bytes:
    """The (decoded) body, read while it streams, refused past MAX_BODY bytes."""
    chunks: list[bytes] = []
    size = 0
    iterator = response.aiter_bytes()
    async for chunk in iterator:
        size += len(chunk)
        if size > provider_input.MAX_BODY:
            break
        chunks.append(chunk)
    else:
        return b"".join(chunks)
    # Hang up, then let httpx's nested generators run into the closed stream and
    # finish, rather than leave them half-way for the garbage collector.
    await response.aclose()
    with contextlib.suppress(Exception):
        async for _ in iterator:
            pass
    raise TransientGrantError(
        f"the answer of {what} is larger than {provider_input.MAX_BODY} bytes; not read further"
    )


def _tls_failure(exc: BaseException) -> str:
    """
    What went wrong in the TLS handshake, if that is what failed.

    httpx over trio wraps an ssl error in errors with no message of their own, and
    "ConnectError" alone sends people looking at the network, not at a certificate.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f" (TLS: {cause.reason}: {cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f" (TLS: {cause.reason or cause})"
        cause = cause.__cause__ or cause.__context__
    return ""
