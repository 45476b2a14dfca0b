"""
A small trio-native etcd v3 client over etcd's JSON gateway (/v3/...), with httpx.

Only what a fleet of daemons needs: read a key or a prefix, put, delete, a
transaction that writes only if a key's mod_revision is still the one read
(and a lock key is still ours: the fence), leases (grant, keep alive,
revoke), and a watch of a prefix that resumes where it stopped. Keys and
values are base64 in the JSON; 64-bit numbers are strings.

Every call goes to one endpoint and moves on to the next when that one does
not answer, answers 5xx, or has no leader; when none answers it raises
`Unavailable`, and the caller keeps what it holds. Nothing here sleeps or
retries forever: the caller decides.

Why not a library: python-etcd3 and etcd3gw are blocking (gRPC or requests)
and unmaintained; aetcd is asyncio. httpx is already a dependency and
speaks trio, and the JSON gateway ships with every etcd since 3.3.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from mailoauthd import errors
from mailoauthd.errors import StateError
from mailoauthd.secret import Secret


class EtcdError(StateError):
    """etcd refused a request (a bug or a misconfiguration on our side, or no permission)."""

    code = errors.ETCD


class Unavailable(EtcdError):
    """No endpoint answered, or none had a leader (no quorum)."""

    code = errors.ETCD_UNAVAILABLE


class TlsRefused(Unavailable):
    """TLS failed with every endpoint: a certificate, CA or key to fix, no outage to wait out."""

    code = errors.ETCD_TLS


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "put" or "delete"
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: a key's create_revision or mod_revision equals `value`."""

    key: str
    target: str  # "CREATE" or "MOD"
    value: int

    def to_json(self) -> dict[str, str]:
        field = "create_revision" if self.target == "CREATE" else "mod_revision"
        return {
            "key": _b64(self.key),
            "target": self.target,
            "result": "EQUAL",
            field: str(self.value),
        }


def _b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def _range_end(prefix: str) -> str:
    """The key just past every key that starts with `prefix`."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64(b"\0")
    raw[-1] += 1
    return _b64(bytes(raw))


def _kv(doc: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(doc.get("key", "")).decode("utf-8", "replace"),
        value=_unb64(doc.get("value", "")),
        create_revision=int(doc.get("create_revision", 0)),
        mod_revision=int(doc.get("mod_revision", 0)),
        version=int(doc.get("version", 0)),
        lease=int(doc.get("lease", 0)),
    )


def _why(exc: httpx.HTTPError, *, endpoint: str, certificate: bool) -> tuple[str, bool]:
    """
    What went wrong with a request, and whether it was TLS (the SSLError under httpx's).

    Args:
        endpoint: where it went.
        certificate: whether we present a client certificate.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: etcd's certificate is not trusted ({cause.verify_message}; ca_file)", True
    if isinstance(cause, ssl.SSLError):
        if "BAD_CERTIFICATE" in str(cause) or "CERTIFICATE_REQUIRED" in str(cause):
            why = "etcd refused our client certificate (cert_file/key_file: none, or not signed"
            return f"TLS: {why} by the CA etcd trusts)", True
        return f"TLS failed: {cause.reason or cause}", True
    if (
        isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)
        and endpoint.startswith("https:")
        and not certificate
    ):
        # TLS 1.3 lets a client finish its handshake and send before the server has
        # checked its certificate; on a busy machine the server's alert then loses the
        # race to a reset, and the refusal arrives as a closed connection instead.
        why = "etcd closed the connection after the TLS handshake, as it does when it"
        return f"TLS: {why} requires a client certificate (cert_file/key_file: none)", True
    return type(exc).__name__, False


def _message(answer: httpx.Response, doc: object) -> str:
    """etcd's reason for a refusal: its JSON `message`, else its plain text (the gateway's own)."""
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return answer.text.strip()[:200] or str(answer.status_code)


def _unavailable(doc: dict[str, Any]) -> bool:
    message = str(doc.get("message") or doc.get("error") or "")
    return any(
        words in message
        for words in ("no leader", "timed out", "leader changed", "not capable", "stopped")
    )


class Etcd:
    """A client of one etcd cluster; its calls may run concurrently."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        http: httpx.AsyncClient,
        timeout: float = 5.0,
        username: str | None = None,
        password: Secret | None = None,
        certificate: bool = False,
    ) -> None:
        """`certificate`: whether `http` presents a client certificate (cert_file/key_file)."""
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.http = http
        self.timeout = timeout
        self.username = username
        self.password = password
        self.certificate = certificate
        self._current = 0
        self._token: str | None = None

    # --- the one way a request is sent ---------------------------------------

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """
        POST `body` to /v3/`path` at the first endpoint that answers; the answer's JSON.

        Raises:
            Unavailable: no endpoint answered, or none had a leader.
            EtcdError: etcd refused the request.
        """
        problems, tls = [], 0
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                answer = await self._post(endpoint, path, body)
            except httpx.HTTPError as exc:
                why, was_tls = _why(exc, endpoint=endpoint, certificate=self.certificate)
                problems.append(f"{endpoint}: {why}")
                tls += was_tls
                continue
            try:
                doc = answer.json()
            except ValueError:
                doc = {}
            if answer.status_code == 200 and isinstance(doc, dict):
                self._current = index
                return doc
            if answer.status_code >= 500 or _unavailable(doc):
                problems.append(f"{endpoint}: {doc.get('message') or answer.status_code}")
                continue
            raise EtcdError(f"etcd {endpoint}/v3/{path}: {_message(answer, doc)}")
        kind = TlsRefused if tls == len(self.endpoints) else Unavailable
        raise kind("etcd is unavailable (" + "; ".join(problems) + ")")

    async def _headers(self, endpoint: str) -> dict[str, str]:
        """etcd's auth token as the gateway takes it (`Authorization`), got once and kept."""
        if self.username is None:
            return {}
        if self._token is None:
            self._token = await self._authenticate(endpoint)
        return {"Authorization": self._token}

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = await self._headers(endpoint)
        answer = await self.http.post(
            f"{endpoint}/v3/{path}", json=body, headers=headers, timeout=self.timeout
        )
        if self.username is not None and answer.status_code in (401, 403):
            self._token = await self._authenticate(endpoint)
            headers["Authorization"] = self._token
            answer = await self.http.post(
                f"{endpoint}/v3/{path}", json=body, headers=headers, timeout=self.timeout
            )
        return answer

    async def _authenticate(self, endpoint: str) -> str:
        assert self.password is not None
        answer = await self.http.post(
            f"{endpoint}/v3/auth/authenticate",
            json={"name": self.username, "password": self.password.reveal()},
            timeout=self.timeout,
        )
        try:
            doc = answer.json()
        except ValueError:
            doc = {}
        token = doc.get("token") if isinstance(doc, dict) else None
        if answer.status_code != 200 or not isinstance(token, str):
            raise EtcdError(
                f"etcd {endpoint}: authentication as {self.username!r} refused: "
                f"{_message(answer, doc)} (username, password_file)"
            )
        return token

    # --- keys ------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""
        doc = await self.call("kv/range", {"key": _b64(key)})
        kvs = doc.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, and the revision they were read at (to watch from)."""
        doc = await self.call("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        revision = int(doc.get("header", {}).get("revision", 0))
        return [_kv(kv) for kv in doc.get("kvs") or []], revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write a key unconditionally; the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        doc = await self.call("kv/put", body)
        return int(doc.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> bool:
        """Delete a key; whether it was there."""
        doc = await self.call("kv/deleterange", {"key": _b64(key)})
        return int(doc.get("deleted", 0)) > 0

    async def put_if(
        self, key: str, value: bytes, compares: Sequence[Compare], *, lease: int = 0
    ) -> int | None:
        """
        Write `key` only if every comparison holds (the fence); the new revision, or None.

        For a grant: `Compare(key, "MOD", revision_read)` and the holder's lock,
        `Compare(lock_key, "CREATE", lock_revision)`: a daemon that lost its
        lock, or read an older grant, writes nothing.
        """
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        doc = await self.call(
            "kv/txn",
            {"compare": [c.to_json() for c in compares], "success": [{"request_put": put}]},
        )
        if not doc.get("succeeded"):
            return None
        return int(doc.get("header", {}).get("revision", 0))

    async def delete_if(self, key: str, compares: Sequence[Compare]) -> int | None:
        """Delete `key` only if every comparison holds; the new revision, or None."""
        doc = await self.call(
            "kv/txn",
            {
                "compare": [c.to_json() for c in compares],
                "success": [{"request_delete_range": {"key": _b64(key)}}],
            },
        )
        if not doc.get("succeeded"):
            return None
        return int(doc.get("header", {}).get("revision", 0))

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int | None:
        """Write `key` only if it does not exist (a lock); its create_revision, or None."""
        return await self.put_if(key, value, [Compare(key, "CREATE", 0)], lease=lease)

    # --- leases ------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        doc = await self.call("lease/grant", {"TTL": str(ttl)})
        if doc.get("error"):
            raise EtcdError(f"etcd: lease not granted: {doc['error']}")
        return int(doc["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew a lease; the seconds it now has, 0 if it has expired (or was revoked)."""
        try:
            doc = await self.call("lease/keepalive", {"ID": str(lease)})
        except EtcdError as exc:
            if "lease not found" in exc.message:
                return 0
            raise
        return int(doc.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End a lease now: the keys written with it go."""
        try:
            await self.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "lease not found" not in exc.message:
                raise

    # --- watching ------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """
        Every change under `prefix` from `start_revision` on, in order, for as long as it runs.

        Moves to another endpoint when the one it watches on goes away, resuming
        after the last revision it saw; raises Unavailable when none answers.

        Raises:
            Unavailable: no endpoint answered.
            EtcdError: the revision was compacted away (read the prefix again).
        """
        next_revision = start_revision
        failures = 0
        while True:
            endpoint = self.endpoints[self._current]
            request = {
                "create_request": {
                    "key": _b64(prefix),
                    "range_end": _range_end(prefix),
                    "start_revision": str(next_revision),
                }
            }
            try:
                headers = await self._headers(endpoint)
                async with self.http.stream(
                    "POST", f"{endpoint}/v3/watch", json=request, headers=headers, timeout=None
                ) as answer:
                    if answer.status_code != 200:
                        raise httpx.HTTPError(f"HTTP {answer.status_code}")
                    async for line in answer.aiter_lines():
                        if not line.strip():
                            continue
                        doc = json.loads(line)
                        result = doc.get("result") or {}
                        if doc.get("error"):
                            raise httpx.HTTPError(str(doc["error"]))
                        if int(result.get("compact_revision", 0)):
                            raise EtcdError(f"etcd: the watch of {prefix} fell behind a compaction")
                        if result.get("canceled"):  # an expired auth token, for one
                            self._token = None
                            raise httpx.HTTPError(str(result.get("cancel_reason")))
                        failures = 0
                        for event in result.get("events") or []:
                            kv = _kv(event.get("kv", {}))
                            next_revision = kv.mod_revision + 1
                            kind = "delete" if event.get("type") == "DELETE" else "put"
                            yield Event(kind, kv)
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            failures += 1
            self._current = (self._current + 1) % len(self.endpoints)
            if failures >= len(self.endpoints):
                raise Unavailable(f"etcd is unavailable: no endpoint serves a watch of {prefix}")
