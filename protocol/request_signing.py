"""HMAC-SM3 signed HTTP requests: one scheme for every machine-to-machine HTTP call of the platform.

Used by the terminal's local POS API (`X-POS-*` headers, docs/pos-api.md), the server's HIS interfaces (`X-HIS-*`,
docs/his-integration.md) and the server's device API (`X-Device-*`, the terminal signing with its MQTT session key,
docs/identity.md). A request carries four headers with a common prefix:

    <prefix>Client      who signs (a client id; for the device API the session key id)
    <prefix>Timestamp   Unix seconds; refused when more than the window (60 s) away from the receiver's clock
    <prefix>Nonce       16..64 characters of [A-Za-z0-9_-], used once per client within the window
    <prefix>Signature   lower-case hex HMAC-SM3(secret, METHOD + path + timestamp + nonce + hex(sha256(body)))

`path` is the request path with its query string (`/his/v1/purchases?limit=5`), exactly as sent. The body hash
binds the body; the nonce and the timestamp make a captured request useless for replay once the receiver has
seen it (the receiver keeps used nonces for twice the window).

Owns the canonical signing string, signing, the checks that need no state (`verify_signed_request`: shape, time,
signature, in that order; the caller then claims the nonce, so that only a correctly signed request spends one) and
`signed_headers` for clients. It must never log a secret or a signature.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from protocol.envelope import ContractError
from protocol.gm.sm3 import hmac_sm3, mac_equal

NONCE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
DEFAULT_WINDOW_S: Final = 60.0
MAX_TIMESTAMP_DIGITS: Final = 12


class RequestAuthError(ContractError):
    """A signed request that does not authenticate; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a verified request proved: who signed it and with which (still unclaimed) nonce."""

    client_id: str
    nonce: str
    timestamp: int


def signing_string(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What is signed: METHOD + path + timestamp + nonce + hex(sha256(body)), concatenated without separators."""
    return (method.upper() + path + timestamp + nonce + hashlib.sha256(body).hexdigest()).encode()


def sign_request(secret: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The signature header's value: lower-case hex of HMAC-SM3(secret, signing_string(...))."""
    return hmac_sm3(secret, signing_string(method, path, timestamp, nonce, body)).hex()


def new_nonce() -> str:
    """A fresh random nonce (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def signed_headers(
    prefix: str, client_id: str, secret: bytes, method: str, path: str, body: bytes, *, now: float
) -> dict[str, str]:
    """The four headers that sign one request (`prefix` e.g. "X-HIS-"); `path` includes the query string."""
    timestamp = str(int(now))
    nonce = new_nonce()
    return {
        f"{prefix}Client": client_id,
        f"{prefix}Timestamp": timestamp,
        f"{prefix}Nonce": nonce,
        f"{prefix}Signature": sign_request(secret, method, path, timestamp, nonce, body),
    }


def verify_signed_request(
    prefix: str,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    body: bytes,
    secret_of: Callable[[str], bytes | None],
    now: float,
    window_s: float = DEFAULT_WINDOW_S,
) -> SignedRequest:
    """Check shape, client, time and signature of a request; raise `RequestAuthError` otherwise.

    `headers` must be case-insensitive (Starlette's and httpx's are) or use the exact names. `secret_of` returns the
    client's secret, or None for an unknown client. The nonce is checked for shape only: the caller claims it."""
    client_id = headers.get(f"{prefix}Client")
    timestamp = headers.get(f"{prefix}Timestamp")
    nonce = headers.get(f"{prefix}Nonce")
    signature = headers.get(f"{prefix}Signature")
    if not client_id or not timestamp or not nonce or not signature:
        raise RequestAuthError(
            "missing_header", f"{prefix}Client, -Timestamp, -Nonce and -Signature headers are required"
        )
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > MAX_TIMESTAMP_DIGITS:
        raise RequestAuthError("bad_timestamp", f"{prefix}Timestamp must be Unix seconds")
    if abs(now - int(timestamp)) > window_s:
        raise RequestAuthError("stale_timestamp", f"{prefix}Timestamp is more than {window_s:.0f} s from now")
    if NONCE_PATTERN.fullmatch(nonce) is None:
        raise RequestAuthError("bad_nonce", f"{prefix}Nonce must be 16..64 characters of [A-Za-z0-9_-]")
    secret = secret_of(client_id)
    if secret is None:
        raise RequestAuthError("unknown_client", f"unknown or revoked client in {prefix}Client")
    try:
        given = bytes.fromhex(signature)
    except ValueError:
        given = b""
    if not mac_equal(hmac_sm3(secret, signing_string(method, path, timestamp, nonce, body)), given):
        raise RequestAuthError("bad_signature", f"{prefix}Signature does not verify")
    return SignedRequest(client_id=client_id, nonce=nonce, timestamp=int(timestamp))
