"""The server's side of the route map: heartbeats, the drain announcement and leaving.

All of it goes through one :class:`RouteMapClient`, which push.py's PeerDirectory reads
the swarm's servers through as well. A route map that cannot be reached costs a heartbeat
a warning in the log, never the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord
from llmswarm_core.routemap_client import RouteMapClient, RouteMapError
from llmswarm_node.push import PeerDirectory

log = logging.getLogger("llmswarm.node")

HEARTBEAT_SECONDS = 2.0
HEARTBEAT_TIMEOUT = 5.0  # seconds one heartbeat (or a push target's look-up) may take
FAREWELL_TIMEOUT = 3.0  # seconds the drain announcement and the leave may take, on the way out


class Announcer:
    """Announces server `server_id` of `model`, as `record()` says it is now, to the route map at `url`
    (None: a server of no swarm). Announcements and the leave are signed with the server's `identity`."""

    def __init__(self, url: str | None, token: str | None, tls_ca: str | None, server_id: str, model: ModelInfo,
                 record: Callable[[], ServerRecord], identity: ServerIdentity | None = None) -> None:
        self.identity = identity or ServerIdentity.generate()
        self.url = url
        self.token = token
        self.tls_ca = tls_ca
        self.server_id = server_id
        self.model = model
        self.record = record
        self._routes: RouteMapClient | None = None  # made by route_map(): it needs the running event loop
        self._heartbeat: asyncio.Task[None] | None = None

    def route_map(self) -> RouteMapClient | None:
        """The server's one route-map client (None without a route map), made on first use in the event loop."""
        if self.url and self._routes is None:
            self._routes = RouteMapClient(self.url, self.token, self.tls_ca, timeout=HEARTBEAT_TIMEOUT)
        return self._routes

    def peers(self, on_read: Callable[[RouteMap], None] | None = None) -> PeerDirectory:
        """The push peers' directory, reading the route map through the same client (`on_read`: told each read)."""
        return PeerDirectory(self.route_map(), on_read)

    def start_heartbeat(self) -> None:
        """Announce every HEARTBEAT_SECONDS (once the server is online and knows its URL)."""
        if self.route_map() is not None and self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat_forever())

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self.announce()
            except RouteMapError as error:
                log.warning("%s", error)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def announce(self) -> None:
        """One announcement of the server as it is now; raises RouteMapError where it fails."""
        routes = self.route_map()
        if routes is not None:
            announcement = Announcement(model=self.model, server=self.record(), ttl=HEARTBEAT_SECONDS * 5)
            await routes.announce(announcement.signed(self.identity))

    async def announce_draining(self) -> None:
        """Tell the route map at once that the server drains (best effort, FAREWELL_TIMEOUT at most)."""
        await self._farewell(self.announce(), "announce the drain")

    async def leave(self) -> None:
        """Stop the heartbeat and leave the route map (best effort, FAREWELL_TIMEOUT at most)."""
        await self.stop_heartbeat()
        routes = self.route_map()
        if routes is not None:
            await self._farewell(routes.leave(self.server_id, self.identity), "leave")

    async def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None

    async def close(self) -> None:
        await self.stop_heartbeat()
        if self._routes is not None:
            await self._routes.close()
            self._routes = None

    async def _farewell(self, call: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await asyncio.wait_for(call, FAREWELL_TIMEOUT)
        except (TimeoutError, RouteMapError) as error:
            log.info("could not %s at the route map: %s", what, error)
