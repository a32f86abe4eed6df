"""A small typed HTTP client for the server's device API, used by the provisioning CLI.

Errors from httpx are translated once, here, into `ProvisioningError` with a message an admin can act on.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx


class ProvisioningError(RuntimeError):
    """The server could not be reached or refused the request; the text says which and why."""


class ServerClient:
    def __init__(self, base_url: str, *, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)

    def _get(self, path: str, **params: Any) -> Any:
        try:
            resp = self._http.get(path, params=params or None)
        except httpx.HTTPError as exc:
            raise ProvisioningError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if resp.status_code == 404:
            raise ProvisioningError(_detail(resp) or f"not found: {path}")
        if resp.status_code >= 400:
            raise ProvisioningError(f"server refused {path} ({resp.status_code}): {_detail(resp)}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ProvisioningError(f"server sent a non-JSON answer for {path}") from exc

    def list_devices(self) -> list[dict[str, Any]]:
        body = self._get("/api/v1/devices")
        items: list[dict[str, Any]] = body["items"]
        return items

    def get_device(self, device_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._get(f"/api/v1/devices/{device_id}")
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
        return str(body["detail"])
    return str(body)[:200]
