"""The operator's record through the Kubernetes API: a watch on the route-map ConfigMap.

The route-map pod also mounts that ConfigMap as a file, but the kubelet refreshes a mounted
ConfigMap on its own sync loop (a minute or more), while the operator deletes an old server
``drain_seconds`` (30 s) after it starts draining: from the file alone, clients would be
routed to servers that no longer exist. Watching the object itself brings each new record
within a second. The file stays a second source (for when the API cannot be reached); the
authority keeps the newest record of the two (:meth:`~llmswarm_control.routemap_authority.OperatorRecord.load`).

The pod's own ServiceAccount may only ``get``, ``list`` and ``watch`` that one ConfigMap
(a Role with ``resourceNames``): so the watch is a list/watch with
``fieldSelector=metadata.name=<name>``, which RBAC matches against ``resourceNames``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from llmswarm_core.routemap import RouteMap

log = logging.getLogger("llmswarm_core.routemap")

ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
ROUTES_KEY = "routes.json"


@dataclass(frozen=True)
class ConfigMapRef:
    """Where the record is: an API server, a namespace and a ConfigMap name, and the credentials to read it."""

    server: str  # https://host:port (in a pod), or http:// for a test's API server
    namespace: str
    name: str
    token_file: Path | None = None
    ca_file: Path | None = None
    key: str = ROUTES_KEY

    @classmethod
    def in_cluster(cls, name: str, namespace: str | None = None, account_dir: Path = ACCOUNT_DIR,
                   environ: Mapping[str, str] | None = None) -> ConfigMapRef:
        """The pod's own API server and service account (its namespace unless one is given)."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:
            host = f"[{host}]"  # an IPv6 address
        if namespace is None:
            namespace = (account_dir / "namespace").read_text().strip()
        ca = account_dir / "ca.crt"
        return cls(f"https://{host}:{port}", namespace, name, account_dir / "token", ca if ca.exists() else None)

    def token(self) -> str | None:
        """The service-account token, read again at every connection (the kubelet rotates it)."""
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError:
            return None

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace)}/configmaps"


class ConfigMapWatch:
    """Get the ConfigMap, then watch it; hand each new valid record to `deliver`. Reconnects for ever."""

    def __init__(self, ref: ConfigMapRef, deliver: Callable[[RouteMap], None], retry: float = 1.0,
                 timeout: int = 290) -> None:
        self.ref = ref
        self.deliver = deliver
        self.retry = retry
        self.timeout = timeout  # seconds the API server keeps one watch open
        self._raw: str | None = None

    async def run(self) -> None:
        context: ssl.SSLContext | None = None
        if self.ref.server.startswith("https://"):
            context = ssl.create_default_context(cafile=os.fspath(self.ref.ca_file) if self.ref.ca_file else None)
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(connect=10, sock_read=self.timeout + 30),
                                         headers={"Accept": "application/json", "User-Agent": "llmswarm-routemap"}) as http:
            while True:
                try:
                    version = await self._get(http)
                    await self._watch(http, version)
                except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as error:
                    log.warning("watching ConfigMap %s/%s: %s; retrying in %g s", self.ref.namespace, self.ref.name, error,
                                self.retry)
                await asyncio.sleep(self.retry)

    def _headers(self) -> dict[str, str]:
        token = self.ref.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _get(self, http: aiohttp.ClientSession) -> str:
        """Read the ConfigMap now; its resourceVersion (where the watch starts)."""
        async with http.get(f"{self.ref.server}{self.ref.path}/{quote(self.ref.name)}", headers=self._headers()) as response:
            if response.status == 404:
                return ""  # not created yet: the watch will see it come
            if response.status != 200:
                raise ValueError(f"GET answered {response.status}: {(await response.text())[:300]}")
            obj = await response.json()
        self._take(obj)
        return str((obj.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, http: aiohttp.ClientSession, version: str) -> None:
        params = {"watch": "true", "fieldSelector": f"metadata.name={self.ref.name}", "timeoutSeconds": str(self.timeout),
                  "allowWatchBookmarks": "true"}
        if version:
            params["resourceVersion"] = version
        async with http.get(f"{self.ref.server}{self.ref.path}", params=params, headers=self._headers()) as response:
            if response.status != 200:
                raise ValueError(f"watch answered {response.status}: {(await response.text())[:300]}")
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old; get the object again
                    return
                if kind in ("ADDED", "MODIFIED") and (obj.get("metadata") or {}).get("name") == self.ref.name:
                    self._take(obj)

    def _take(self, obj: Mapping[str, Any]) -> None:
        raw = (obj.get("data") or {}).get(self.ref.key)
        if raw is None or raw == self._raw:
            return
        self._raw = raw
        try:
            routes = RouteMap.model_validate_json(raw)
        except ValidationError as error:
            log.warning("ConfigMap %s/%s holds no valid route map (%s); keeping the last one", self.ref.namespace,
                        self.ref.name, error.errors()[0]["msg"])
            return
        log.info("route map from the API (record version %s)", routes.version)
        self.deliver(routes)
