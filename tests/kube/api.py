"""The node's client of the Kubernetes API: what a kubelet or a controller does over HTTP.

Plain JSON over aiohttp against the emulator's URL (no kubeconfig, no discovery): get, list,
create, merge-patch and delete by path. Paths are built by :func:`path`.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

Body = dict[str, Any]

CORE = "/api/v1"
APPS = "/apis/apps/v1"
BATCH = "/apis/batch/v1"


def path(group: str, plural: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
    """``path(CORE, "pods", "ns", "p", "status")`` -> ``/api/v1/namespaces/ns/pods/p/status``."""
    out = group + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


class ApiError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, text: str) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {text[:300]}")
        self.status = status


class Api:
    """A small async client of one API server."""

    def __init__(self, url: str, user_agent: str = "kubelet/tests-kube") -> None:
        self.url = url.rstrip("/")
        self._http = aiohttp.ClientSession(headers={"User-Agent": user_agent}, timeout=aiohttp.ClientTimeout(total=30))

    async def close(self) -> None:
        await self._http.close()

    async def _request(self, method: str, where: str, body: Body | None = None,
                       content_type: str = "application/json") -> Body | None:
        url = self.url + where
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._http.request(method, url, data=data, headers=headers) as response:
            text = await response.text()
            if response.status == 404:
                return None
            if response.status >= 400:
                raise ApiError(method, where, response.status, text)
            return json.loads(text) if text else {}  # type: ignore[no-any-return]

    async def get(self, where: str) -> Body | None:
        """The object, or None when it does not exist."""
        return await self._request("GET", where)

    async def list(self, where: str) -> list[Body]:
        answer = await self._request("GET", where)
        return list((answer or {}).get("items") or [])

    async def create(self, where: str, body: Body) -> Body | None:
        return await self._request("POST", where, body)

    async def patch(self, where: str, body: Body) -> Body | None:
        """A JSON merge patch; None when the object is gone."""
        return await self._request("PATCH", where, body, "application/merge-patch+json")

    async def delete(self, where: str) -> bool:
        return await self._request("DELETE", where) is not None
