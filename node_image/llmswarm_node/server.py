"""The block server: one span of blocks behind HTTP and WebSocket routes, announced to a route map.

Layers, one job each (as Petals' server: handler -> block functions -> backend -> task pool):

- http_handlers.py and session_handlers.py decode frames, check them (validation.py, pure),
  submit the work and encode typed replies; every failure is answered by replies.error_reply;
- scheduler.py runs the passes that batch_policy.py (pure) picks, batched across sessions
  (batching.py), through the span (span.py, loaded by span_loader.py);
- connections.py bounds connections (count, header time), admission.py the forward/backward requests in
  flight, memory.py (pure) each pass's memory, sessions.py the sessions (per server, connection, address);
- announcer.py keeps the server in the route map (heartbeat, drain, leave) through the one
  route-map client that push.py's peer directory reads too.

This module builds them around one shared :class:`Node` (context.py) and runs the server.

Endpoints:
  GET  /healthz       the process is alive
  GET  /readyz        the span is loaded and the server takes requests
  GET  /info          model, span, dtype, throughput, cache use (JSON)
  GET  /metrics       Prometheus metrics
  POST /v1/forward    stateless forward: one frame in, one frame out
  POST /v1/backward   gradients of a forward's inputs (and deep prompts); weights stay frozen
  GET  /v1/weights-digest  SHA-256 of the span's weights
  GET  /v1/identity?challenge=...  the server's id and public key, and the challenge signed with its key
                      (the route map lists a server online only once its address answered this)
  GET  /v1/session    WebSocket of inference sessions (open / step / close frames)
  GET  /v1/push       WebSocket for the previous server of a client's chain to hand over a step (push.py)
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web

from llmswarm_core import wire
from llmswarm_core.arch import kv_bytes_per_token, kv_shape
from llmswarm_core.credentials import Role, Verifier
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import RouteMap
from llmswarm_core.security import OPEN_PATHS, access_middleware, server_ssl_context
from llmswarm_node.announcer import Announcer
from llmswarm_node.connections import ConnectionGate, GatedRunner
from llmswarm_node.context import Node, ServerOptions
from llmswarm_node.http_handlers import HttpHandlers
from llmswarm_node.metrics import ServerMetrics
from llmswarm_node.push import FRESH_SECONDS, Pusher
from llmswarm_node.relay_agent import RelayAgent
from llmswarm_node.scheduler import Scheduler
from llmswarm_node.session_handlers import FRAME_SLACK, SessionHandlers
from llmswarm_node.sessions import SessionTable
from llmswarm_node.span import SpanRunner

__all__ = ["BlockServer", "ServerOptions", "serve"]

log = logging.getLogger("llmswarm.node")


def _role_of(request: web.Request) -> Role | None:
    """Probes, metrics and the identity proof are open; everything else needs the use role."""
    return None if request.path in OPEN_PATHS else "use"


class BlockServer:
    def __init__(self, span: SpanRunner, options: ServerOptions) -> None:
        limits = options.limits
        metrics = ServerMetrics()
        sessions = SessionTable(limits, kv_bytes_per_token(*kv_shape(span.source.config), span.dtype.itemsize))
        identity = (ServerIdentity.load_or_create(Path(options.identity_file)) if options.identity_file
                    else ServerIdentity.generate())
        self.node = Node(
            span=span,
            options=options,
            id=options.server_id or identity.server_id,
            identity=identity,
            metrics=metrics,
            sessions=sessions,
            scheduler=Scheduler(span, options.batching, metrics, sessions.cycling, limits.compute_memory_bytes),
            wire_limits=wire.WireLimits(max_tensor_bytes=limits.max_message_bytes),
            url=options.public_url or "",
        )
        metrics.span_start.set(span.start)
        metrics.span_end.set(span.end)
        metrics.kv_cache_limit.set(limits.kv_cache_bytes)
        metrics.info.labels(options.model_name, self.node.dtype_name, self.node.id).set(1)
        self.announcer = Announcer(options.swarm, options.token, options.tls_ca, self.node.id, self.node.model_info(),
                                   self.node.record, identity)
        self.gate = ConnectionGate(limits.max_connections, limits.header_timeout)
        # Who may call it: the shared token, or, with an authority key, a credential of the swarm's authority holding
        # `use` (revoked ones are learned from the route map with the push peers); the server's own token is then its
        # credential to the route map and its peers, not a key to this server.
        self.verifier = Verifier(options.authority_key, None if options.authority_key else options.token)
        self.http_handlers = HttpHandlers(self.node)
        self.session_handlers = SessionHandlers(self.node)
        self._tasks: list[asyncio.Task[None]] = []

    def _learn_revocations(self, routes: RouteMap) -> None:
        """Credentials revoked at the route map are refused here from the next read on (every FRESH_SECONDS)."""
        self.verifier.revoked = set(routes.revoked)

    def _refused(self, reason: str) -> None:
        self.node.metrics.auth_refusals.labels(reason).inc()

    @property
    def options(self) -> ServerOptions:
        return self.node.options

    def set_throughput(self, tokens_per_second: float) -> None:
        """The span's measured inference throughput: announced and exported."""
        self.node.throughput = tokens_per_second
        self.node.metrics.throughput.set(tokens_per_second)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.node.limits.max_message_bytes + FRAME_SLACK,
                              middlewares=[self.gate.middleware, access_middleware(self.verifier, _role_of, self._refused)])
        self.http_handlers.add_routes(app)
        self.session_handlers.add_routes(app)
        app.on_startup.append(self._start_background)
        app.on_cleanup.append(self._stop_background)
        return app

    async def _start_background(self, app: web.Application) -> None:
        self._tasks.append(asyncio.create_task(self._expire_sessions()))
        peers = self.announcer.peers(self._learn_revocations)
        peers.keep_fresh(FRESH_SECONDS)
        relay_base = self.options.swarm if self.options.relay else None
        self.session_handlers.pusher = Pusher(peers, self.options.token, self.options.tls_ca,
                                              timeout=self.node.limits.push_timeout, relay=relay_base)

    async def _stop_background(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.options.swarm:
            self.node.state = "draining"
            await self.announcer.leave()
        if self.session_handlers.pusher is not None:
            await self.session_handlers.pusher.close()
        await self.announcer.close()
        self.node.scheduler.shutdown()

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.node.limits.session_idle_timeout / 2))
            expired = self.node.sessions.expire()
            if expired:
                log.info("expired idle sessions %s", expired)
                self.node.update_session_gauges()

    async def drain(self) -> None:
        """Leave the route map's online set, let open sessions finish (up to drain_timeout), then return."""
        sessions = self.node.sessions
        self.node.state = "draining"
        log.info("draining: %d open session(s), up to %.0f s", len(sessions), self.options.drain_timeout)
        await self.announcer.announce_draining()
        deadline = time.monotonic() + self.options.drain_timeout
        while len(sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if len(sessions):
            log.warning("drain timeout: closing %d session(s); their clients fail over", len(sessions))


async def serve(server: BlockServer, host: str, port: int, stop: asyncio.Event | None = None) -> None:
    """Run the server until `stop` is set (then drain) or until cancelled (no drain)."""
    runner = GatedRunner(server.app(), server.gate, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    context = server_ssl_context(server.options.tls_cert, server.options.tls_key)
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    node = server.node
    bound_port = runner.addresses[0][1]
    scheme = "https" if context else "http"
    agent = None
    if server.options.relay and server.options.swarm:
        local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        agent = RelayAgent(server.options.swarm, node.id, node.identity, server.options.token, server.options.tls_ca,
                           f"{scheme}://{local}:{bound_port}", node.limits.max_message_bytes + FRAME_SLACK)
        node.url = await agent.start()
    elif not node.url:
        node.url = f"{scheme}://{host}:{bound_port}"
    node.state = "online"
    server.announcer.start_heartbeat()
    print(f"llmswarm-node {node.id} serving blocks [{node.span.start}, {node.span.end}) at {node.url}", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
        await server.drain()
    finally:
        await runner.cleanup()
        if agent is not None:
            await agent.close()
