"""The route-map service on Kubernetes: the operator's map from a file, enriched by announcements.

``python -m llmswarm_control.routemap_file --routes /etc/llmswarm/routes.json`` serves the
same API as :mod:`llmswarm_control.routemap_service`:

  GET    /v1/routes          the map (RouteMap JSON)
  POST   /v1/servers         announce or heartbeat (Announcement JSON)
  DELETE /v1/servers/{id}    forget a server's announcement
  GET    /healthz, /metrics

The file (the operator's ConfigMap, mounted) is the authority on *which* servers belong
to the swarm and on their spans; it is re-read when it changes. Announcements from the
block servers add what only they know: measured throughput and free cache, and
``online`` a little before the kubelet's view reaches the file. A server that is not in
the file is never listed, and ``draining`` in the file always wins.

The published version starts at the file's version and goes up by one whenever what the
map says changes (a new file, a server coming online), so clients can cache by version.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from llmswarm_control.routemap_service import MAX_BODY_BYTES, RouteMapMetrics, read_announcement
from llmswarm_control.routetable import ModelMismatch, RouteTable
from llmswarm_core.defaults import ROUTE_MAP_PORT
from llmswarm_core.routemap import Announcement, RouteMap, ServerRecord
from llmswarm_core.security import TOKEN_ENV, token_from_env, token_middleware

log = logging.getLogger("llmswarm_core.routemap")



class FileRouteMap:
    """The merged map. Pure state; the aiohttp app below is a thin layer over it."""

    def __init__(self) -> None:
        self.file: RouteMap | None = None
        self.table = RouteTable()
        self.version = 0
        self._view: tuple[object, ...] | None = None

    def load(self, routes: RouteMap) -> None:
        if self.file is None or routes.model != self.file.model:
            self.table = RouteTable(routes.model)  # a new model: old announcements mean nothing
        self.file = routes
        if routes.version > self.version:  # adopt the operator's numbering while it is ahead
            self.version = routes.version
            self._view = None

    def announce(self, announcement: Announcement) -> None:
        self.table.announce(announcement)

    def snapshot(self) -> RouteMap:
        if self.file is None:
            return RouteMap(model=None, version=self.version, servers=[])
        self.table.expire()
        announced = {record.id: record for record in self.table.snapshot().servers}
        servers = [self._merge(record, announced.get(record.id)) for record in self.file.servers]
        view = (self.file.model, tuple((s.id, s.url, s.start, s.end, s.state) for s in servers))
        if self._view is None:
            self._view = view
        elif view != self._view:
            self._view = view
            self.version += 1
        return RouteMap(model=self.file.model, version=self.version, servers=servers)

    @staticmethod
    def _merge(record: ServerRecord, heard: ServerRecord | None) -> ServerRecord:
        if heard is None or heard.span != record.span:
            return record
        state = record.state
        if record.state == "joining" and heard.state == "online":
            state = "online"
        elif heard.state == "draining":
            state = "draining"
        return record.model_copy(update={
            "state": state, "throughput": heard.throughput, "cache_tokens_left": heard.cache_tokens_left,
        })


class FileRouteMapService:
    def __init__(self, path: Path, reload_interval: float = 1.0, token: str | None = None) -> None:
        self.path = path
        self.token = token
        self.reload_interval = reload_interval
        self.routes = FileRouteMap()
        self._raw: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self.metrics_ = RouteMapMetrics()
        self.registry = self.metrics_.registry

    def reload(self) -> bool:
        """Read the file if it changed; keep the last good map if it is missing or broken."""
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            if self._raw is not None:
                log.warning("cannot read %s: %s; keeping the last map", self.path, error)
            return False
        if raw == self._raw:
            return False
        try:
            routes = RouteMap.model_validate_json(raw)
        except ValidationError as error:
            log.warning("%s is not a valid route map (%s); keeping the last map", self.path, error.errors()[0]["msg"])
            self._raw = raw
            return False
        self._raw = raw
        self.routes.load(routes)
        return True

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[token_middleware(self.token)])
        app.router.add_get("/v1/routes", self.get_routes)
        app.router.add_post("/v1/servers", self.announce)
        app.router.add_delete("/v1/servers/{server_id}", self.leave)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.reload()
        self._task = asyncio.create_task(self._reload_forever())

    async def _stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            if self.reload():
                log.info("route map reloaded from %s (file version %s)", self.path,
                         self.routes.file.version if self.routes.file else "-")

    async def get_routes(self, request: web.Request) -> web.Response:
        return web.json_response(self.routes.snapshot().model_dump())

    async def announce(self, request: web.Request) -> web.Response:
        announcement = await read_announcement(request)
        if isinstance(announcement, web.Response):
            return announcement
        try:
            self.routes.announce(announcement)
        except ModelMismatch as error:
            return web.json_response({"error": str(error)}, status=409)
        listed = self.routes.file is not None and any(s.id == announcement.server.id for s in self.routes.file.servers)
        return web.json_response({"version": self.routes.snapshot().version, "listed": listed})

    async def leave(self, request: web.Request) -> web.Response:
        removed = self.routes.table.remove(request.match_info["server_id"])
        return web.json_response({"removed": removed}, status=200 if removed else 404)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "loaded": self.routes.file is not None})

    async def metrics(self, request: web.Request) -> web.Response:
        return self.metrics_.response(self.routes.snapshot())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmswarm_control.routemap_file", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=Path, required=True, help="route-map JSON file (the operator's ConfigMap)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=ROUTE_MAP_PORT)
    parser.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks of the file")
    parser.add_argument("--token", help=f"swarm token required on /v1 requests (default: ${TOKEN_ENV})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = FileRouteMapService(args.routes, args.reload_interval, token_from_env(args.token))
    web.run_app(service.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
