"""The route-map service: servers announce themselves, clients read the map.

  GET    /v1/routes          the current map (RouteMap JSON)
  POST   /v1/servers         announce or heartbeat (Announcement JSON)
  DELETE /v1/servers/{id}    leave the map
  GET    /v1/targets         the servers as Prometheus HTTP service discovery (``http_sd_configs``)
  GET    /healthz, /metrics

With a swarm token set, everything but /healthz and /metrics needs it (security.py).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError

from llmswarm_control.routetable import ModelMismatch, RouteTable
from llmswarm_core.routemap import STATES, Announcement, ModelInfo, RouteMap
from llmswarm_core.security import token_middleware

log = logging.getLogger("llmswarm_core.routemap")

MAX_BODY_BYTES = 64 * 1024


def prometheus_targets(routes: RouteMap) -> list[dict[str, object]]:
    """``[{"targets": ["host:port"], "labels": {"__scheme__": ..., "__metrics_path__": ...}}]``, one group per server."""
    groups: list[dict[str, object]] = []
    for server in routes.servers:
        url = urlsplit(server.url)
        if not url.netloc:
            continue
        path = url.path.rstrip("/") + "/metrics"
        groups.append({"targets": [url.netloc], "labels": {"__scheme__": url.scheme, "__metrics_path__": path}})
    return groups


class RouteMapMetrics:
    """The route map's own metrics, shared by the announcement-driven and the file-driven services."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._version = Gauge("llmswarm_routemap_version", "Version of the published route map", registry=self.registry)
        self._servers = Gauge("llmswarm_routemap_servers", "Servers in the route map, by state", ["state"],
                              registry=self.registry)
        self._min_replicas = Gauge("llmswarm_routemap_min_replicas", "Fewest online servers covering any block",
                                   registry=self.registry)
        self._uncovered = Gauge("llmswarm_routemap_uncovered_blocks", "Blocks no online server covers",
                                registry=self.registry)
        self._block_replicas = Gauge("llmswarm_block_replicas", "Online servers covering each block", ["block"],
                                     registry=self.registry)

    def response(self, snapshot: RouteMap) -> web.Response:
        self._version.set(snapshot.version)
        for state in STATES:
            self._servers.labels(state).set(sum(1 for s in snapshot.servers if s.state == state))
        coverage = snapshot.coverage()
        self._min_replicas.set(min(coverage, default=0))
        self._uncovered.set(sum(1 for c in coverage if c == 0))
        for block, count in enumerate(coverage):
            self._block_replicas.labels(str(block)).set(count)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def read_announcement(request: web.Request) -> Announcement | web.Response:
    """The request's announcement, or the 400 reply that says what is wrong with it."""
    try:
        return Announcement.model_validate_json(await request.read())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return web.json_response({"error": f"bad announcement: {where}: {first.get('msg')}"}, status=400)


class RouteMapService:
    def __init__(self, model: ModelInfo | None = None, expiry_interval: float = 1.0, token: str | None = None) -> None:
        self.table = RouteTable(model)
        self.token = token
        self.expiry_interval = expiry_interval
        self.metrics_ = RouteMapMetrics()
        self.registry = self.metrics_.registry
        self._expiry: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[token_middleware(self.token)])
        app.router.add_get("/v1/routes", self.routes)
        app.router.add_post("/v1/servers", self.announce)
        app.router.add_delete("/v1/servers/{server_id}", self.leave)
        app.router.add_get("/v1/targets", self.targets)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self._expiry = asyncio.create_task(self._expire_forever())

    async def _stop(self, app: web.Application) -> None:
        if self._expiry is not None:
            self._expiry.cancel()

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval)
            gone = self.table.expire()
            if gone:
                log.info("servers %s missed their heartbeats and left the map", gone)

    async def routes(self, request: web.Request) -> web.Response:
        return web.json_response(self.table.snapshot().model_dump())

    async def announce(self, request: web.Request) -> web.Response:
        announcement = await read_announcement(request)
        if isinstance(announcement, web.Response):
            return announcement
        try:
            self.table.announce(announcement)
        except ModelMismatch as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response({"version": self.table.version})

    async def leave(self, request: web.Request) -> web.Response:
        removed = self.table.remove(request.match_info["server_id"])
        return web.json_response({"removed": removed, "version": self.table.version}, status=200 if removed else 404)

    async def targets(self, request: web.Request) -> web.Response:
        """Every server in the map (any state: draining ones still carry load) in Prometheus' HTTP SD format."""
        return web.json_response(prometheus_targets(self.table.snapshot()))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return self.metrics_.response(self.table.snapshot())
