"""The terminal's client of the server's device API (`/device/v1`): request/response calls that need the server
now (fetching templates, pending prescriptions, catalogues, relayed national-platform queries).

Every request is signed with HMAC-SM3 under the terminal's current MQTT session key (`protocol.request_signing`,
headers `X-Device-Id` + `X-Device-Client` = the key id, `-Timestamp`, `-Nonce`, `-Signature`), so the server
authenticates it without an SM2 operation and refuses it once the device or the key is revoked. Without a session
key (not yet handshaken, server away) a call fails at once with `NoSessionKeyError`: callers treat the device API
as best-effort and keep working on what they hold (offline first).

Owns `ServerApi` (httpx; errors translated once, here, into `ServerUnreachableError` / `ServerRefusedError` from
`terminal.session`, with the HTTP status and the server's error code) and `open_sealed`, which opens a value the
server sealed for this device under the session key it signed with. It must never log a key, a signature or a
response body (answers may carry personal data).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlencode

import httpx

from protocol import Clock
from protocol.gm import sm4
from protocol.request_signing import signed_headers
from protocol.secure import SessionKey
from terminal.session import NoSessionKeyError, ServerRefusedError, ServerUnreachableError

logger = logging.getLogger(__name__)

DEVICE_PREFIX: Final = "X-Device-"
DEVICE_ID_HEADER: Final = "X-Device-Id"
DEFAULT_TIMEOUT_S: Final = 10.0


class ServerApi:
    """Signed calls to the device API of the server this terminal is enrolled with. Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        base_url: str,
        device_id: str,
        current_key: Callable[[], SessionKey | None],
        clock: Clock,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)
        self._device_id = device_id
        self._current_key = current_key
        self._clock = clock

    @property
    def device_id(self) -> str:
        return self._device_id

    def close(self) -> None:
        self._http.close()

    def _key(self) -> SessionKey:
        key = self._current_key()
        if key is None or key.expired(self._clock.now()):
            raise NoSessionKeyError("no session key yet: the device API is not available")
        return key

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        """Call `path` (e.g. "/device/v1/whoami"); the decoded JSON answer. `body` is sent as JSON."""
        key = self._key()
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None}, doseq=True)
        target = path + (f"?{query}" if query else "")
        content = b"" if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        headers = signed_headers(
            DEVICE_PREFIX, str(key.key_id), key.key, method, target, content, now=self._clock.now().timestamp()
        )
        headers[DEVICE_ID_HEADER] = self._device_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            resp = self._http.request(method, target, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if resp.status_code >= 400:
            raise ServerRefusedError(
                f"server refused {method} {path} ({resp.status_code}): {_detail(resp)}", status=resp.status_code
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise ServerRefusedError(
                f"server answered {method} {path} with invalid JSON", status=resp.status_code
            ) from exc

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body)

    def open_sealed(self, sealed_hex: str, *, key_id: str, aad: bytes = b"") -> bytes:
        """Open a value the server sealed (SM4-GCM, hex) under the session key `key_id` this terminal signed with."""
        key = self._current_key()
        if key is None or str(key.key_id) != key_id:
            raise NoSessionKeyError("the answer was sealed under a session key this terminal no longer holds")
        return sm4.open(key.key, bytes.fromhex(sealed_hex), aad)


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return resp.reason_phrase
    if isinstance(detail, dict):
        return f"{detail.get('code', '')}: {detail.get('message', '')}".strip(": ")
    return str(detail)[:200]
