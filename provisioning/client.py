"""A small typed HTTP client for the server's device and provisioning API, used by the provisioning CLI.

Errors from httpx are translated once, here, into `ProvisioningError` subclasses that carry the CLI's exit code:
`ServerRefusedError` (the server answered with an error status: exit 3) and `ServerUnreachableError` (no answer:
exit 4). The admin token travels only in the `Authorization` header and is never part of a message.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Final

import httpx

API: Final = "/api/v1"

EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3
EXIT_NETWORK: Final = 4
EXIT_LOCAL: Final = 5


class ProvisioningError(RuntimeError):
    """The server could not be reached or refused the request; the text says which and why."""

    exit_code: int = EXIT_REFUSED


class ServerRefusedError(ProvisioningError):
    """The server answered with an error status (`status`)."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServerUnreachableError(ProvisioningError):
    """No answer: connection refused, DNS, TLS or timeout."""

    exit_code = EXIT_NETWORK


class ServerClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport, headers=headers
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if resp.status_code == 401:
            raise ServerRefusedError(
                f"server refused {path} (401): {_detail(resp)} (check --token / YIBAO_ADMIN_TOKEN)", status=401
            )
        if resp.status_code >= 400:
            raise ServerRefusedError(
                f"server refused {path} ({resp.status_code}): {_detail(resp)}", status=resp.status_code
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise ServerRefusedError(f"server sent a non-JSON answer for {path}", status=resp.status_code) from exc

    # -- monitoring (existing device API)

    def list_devices(self) -> list[dict[str, Any]]:
        body = self._call("GET", f"{API}/devices")
        items: list[dict[str, Any]] = body["items"]
        return items

    def get_device(self, device_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._call("GET", f"{API}/devices/{device_id}")
        return body

    # -- provisioning (admin token)

    def register(
        self,
        device_id: str,
        *,
        institution_id: str | None = None,
        hardware_id: str | None = None,
        claim_ttl_s: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"device_id": device_id}
        for key, value in (
            ("institution_id", institution_id),
            ("hardware_id", hardware_id),
            ("claim_ttl_s", claim_ttl_s),
        ):
            if value is not None:
                body[key] = value
        answer: dict[str, Any] = self._call("POST", f"{API}/provisioning/devices", body)
        return answer

    def reset(self, device_id: str, *, reason: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", f"{API}/provisioning/devices/{device_id}/reset", {"reason": reason})
        return answer

    def revoke(self, device_id: str, *, reason: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call(
            "POST", f"{API}/provisioning/devices/{device_id}/revoke", {"reason": reason}
        )
        return answer

    def provisioning_devices(self) -> list[dict[str, Any]]:
        body = self._call("GET", f"{API}/provisioning/devices")
        if isinstance(body, dict) and isinstance(body.get("items"), list):
            return list(body["items"])
        return list(body) if isinstance(body, list) else []

    def provisioning_device(self, device_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._call("GET", f"{API}/provisioning/devices/{device_id}")
        return body

    def server_identity(self) -> dict[str, Any]:
        body: dict[str, Any] = self._call("GET", f"{API}/server-identity")
        return body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:200]
