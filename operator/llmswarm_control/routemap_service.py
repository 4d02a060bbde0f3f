"""The route-map service: servers announce themselves, clients read the map.

One HTTP API over either authority (:mod:`llmswarm_control.routemap_authority`):
announcements only (the local substrate, :meth:`RouteMapService.announcements`), or an
operator's record plus announcements (Kubernetes, :meth:`RouteMapService.from_record`, the
record being the operator's ConfigMap mounted as a file and re-read when it changes).

  GET    /v1/routes          the current map (RouteMap JSON)
  POST   /v1/servers         announce or heartbeat (Announcement JSON): ``{"version", "listed"}``
  DELETE /v1/servers/{id}    forget a server's announcement: ``{"removed", "version"}`` (404: none)
  GET    /v1/targets         the servers as Prometheus HTTP service discovery (``http_sd_configs``)
  GET    /healthz            alive; /readyz: 200 once there is a map to serve (503 before the record is read)
  /v1/adapters...            published LoRA adapters: publish, list, a span's weights (adapter_routes.py)
  GET    /metrics            ``llmswarm_routemap_*`` and ``llmswarm_block_replicas``

With a swarm token set, everything but /healthz, /readyz and /metrics needs it (security.py).

``python -m llmswarm_control.routemap_service [--routes FILE [--configmap NAME]]`` runs it (the
operator's route-map pods pass ``--routes /etc/llmswarm/routes.json --configmap <swarm>-routemap``:
the record is watched through the API and read from the mounted file, the newer counting;
without ``--routes``, announcements only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import ValidationError

from llmswarm_control.adapter_routes import AdapterRoutes
from llmswarm_control.adapters import AdapterLimits, AdapterStore
from llmswarm_control.record_watch import ConfigMapRef, ConfigMapWatch
from llmswarm_control.relay_hub import RelayHub, RelayLimits
from llmswarm_control.routemap_access import AdminRoutes, role_of
from llmswarm_control.routemap_authority import Announcements, Authority, OperatorRecord
from llmswarm_control.routetable import ModelMismatch
from llmswarm_control.server_identities import IdentityBook, IdentityRefused
from llmswarm_core.credentials import Verifier
from llmswarm_core.defaults import ROUTE_MAP_PORT
from llmswarm_core.identity import IdentityError
from llmswarm_core.routemap import STATES, Announcement, IdentityProof, ModelInfo, RouteMap
from llmswarm_core.routemap_client import LEAVE_HEADER, check_leave
from llmswarm_core.security import (
    AUTHORITY_ENV,
    TOKEN_ENV,
    access_middleware,
    authority_from_env,
    client_ssl_context,
    server_ssl_context,
    token_from_env,
)

log = logging.getLogger("llmswarm_core.routemap")

MAX_BODY_BYTES = 64 * 1024
CHALLENGE_TIMEOUT = 5.0  # seconds an announced address has to answer the identity challenge


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


@dataclass(frozen=True)
class RelayOptions:
    """The route map relays (relay_hub.py); `public_url`: where outside clients and servers reach it."""

    public_url: str | None = None
    limits: RelayLimits = field(default_factory=RelayLimits)


class RouteMapMetrics:
    """The route map's own metrics, set from the map at every scrape."""

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
        self.refusals = Counter("llmswarm_routemap_refusals", "Requests refused, by reason: announcements "
                                "(content_type, invalid, span, throughput, model, unsigned, signature, hijack, banned, "
                                "address, leave) and credentials (credential: missing, unknown, expired or revoked; "
                                "role: without the role the request needs)", ["reason"], registry=self.registry)

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


class Refusal(Exception):
    """An announcement the route map will not take: the reply's status, and the reason counted in the metrics."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    def response(self) -> web.Response:
        return web.json_response({"error": str(self)}, status=self.status)


async def read_announcement(request: web.Request) -> Announcement:
    """The request's announcement; a Refusal says what is wrong with it (nothing of it reaches the map).

    Only ``application/json`` is read: a web page can POST ``text/plain`` or a form to any address
    without a CORS preflight, so that content type is what keeps other sites from announcing."""
    if request.content_type != "application/json":
        raise Refusal(415, "content_type", f"announcements are application/json, not {request.content_type!r}")
    try:
        return Announcement.model_validate_json(await request.read())
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg"))
        if location[-1:] == ("throughput",):
            reason = "throughput"
        elif location[-1:] in (("start",), ("end",)) or "outside the model" in message or "empty span" in message:
            reason = "span"
        else:
            reason = "invalid"
        raise Refusal(400, reason, f"bad announcement: {'.'.join(location) or 'body'}: {message}") from None


class RecordFile:
    """The operator's record as a file (its ConfigMap, mounted): hands each new valid map to `deliver`.

    A file that is missing, unreadable or not a valid map keeps the last good one.
    """

    def __init__(self, path: Path, deliver: Callable[[RouteMap], None]) -> None:
        self.path = path
        self.deliver = deliver
        self._raw: bytes | None = None

    def poll(self) -> bool:
        """Read the file; True when it brought a new map."""
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            if self._raw is not None:
                log.warning("cannot read %s: %s; keeping the last map", self.path, error)
            return False
        if raw == self._raw:
            return False
        self._raw = raw
        try:
            routes = RouteMap.model_validate_json(raw)
        except ValidationError as error:
            log.warning("%s is not a valid route map (%s); keeping the last map", self.path, error.errors()[0]["msg"])
            return False
        self.deliver(routes)
        log.info("route map reloaded from %s (record version %s)", self.path, routes.version)
        return True


class RouteMapService:
    """The aiohttp app over an :class:`~llmswarm_control.routemap_authority.Authority`.

    Every `interval` seconds it expires silent servers and, with a record, polls it.
    :attr:`published` is the current map; it is replaced (never changed) on every change,
    so other threads may read it.
    """

    def __init__(self, authority: Authority, token: str | None = None, interval: float = 1.0,
                 poll: Callable[[], object] | None = None, clock: Callable[[], float] = time.monotonic,
                 identities: IdentityBook | None = None, tls_ca: str | None = None,
                 adapters: AdapterStore | None = None, authority_key: str | None = None,
                 relay: RelayOptions | None = None) -> None:
        self.authority = authority
        self.adapters = adapters or AdapterStore()  # published LoRA adapters (adapters.py)
        # Who may speak for which server id, and which addresses proved to be theirs (see server_identities):
        # signed announcements only, and a server is online once its address answered as it.
        self.identities = identities or IdentityBook()
        # Who may call it: the shared token (every role), or credentials signed by `authority_key` (routemap_access).
        self.verifier = Verifier(authority_key, token)
        self._tls_ca = tls_ca
        self._proving: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.token = token
        self.interval = interval
        self.clock = clock
        self._poll = poll
        self.metrics_ = RouteMapMetrics()
        self.registry = self.metrics_.registry
        self.published = authority.snapshot()
        self._task: asyncio.Task[None] | None = None
        # With a relay (relay_hub.py): servers behind NAT attach, and clients reach any server through this address.
        self.relay = None if relay is None else RelayHub(
            self.identities, lambda: self.published, self.registry, relay.public_url, tls_ca, relay.limits,
            lambda reason: self.metrics_.refusals.labels(reason).inc())

    @classmethod
    def announcements(cls, model: ModelInfo | None = None, token: str | None = None, interval: float = 1.0,
                      adapters: AdapterStore | None = None, identities: IdentityBook | None = None,
                      tls_ca: str | None = None, authority_key: str | None = None,
                      relay: RelayOptions | None = None) -> RouteMapService:
        """Announcements only (the local substrate)."""
        return cls(Announcements(model), token, interval, adapters=adapters, identities=identities, tls_ca=tls_ca,
                   authority_key=authority_key, relay=relay)

    #: With a record in a ConfigMap: the watch that brings each new one through the API (see record_watch).
    watch: ConfigMapWatch | None = None
    _watch_task: asyncio.Task[None] | None = None

    @classmethod
    def from_record(cls, path: Path, token: str | None = None, interval: float = 1.0,
                    configmap: ConfigMapRef | None = None, identities: IdentityBook | None = None,
                    tls_ca: str | None = None, relay: RelayOptions | None = None,
                    outside: bool = False) -> RouteMapService:
        """The operator's record in `path` plus announcements (Kubernetes); with `configmap`, the same record
        watched through the API as well (the newer of the two counts: the mounted file lags a minute)."""
        authority = OperatorRecord(outside=outside)
        service = cls(authority, token, interval, poll=RecordFile(path, lambda routes: authority.load(routes, "file")).poll,
                      identities=identities, tls_ca=tls_ca, relay=relay)
        if configmap is not None:
            def from_api(routes: RouteMap) -> None:
                authority.load(routes, "api")
                service.published = authority.snapshot()
            service.watch = ConfigMapWatch(configmap, from_api, retry=interval)
        return service

    def app(self) -> web.Application:
        refused = self.metrics_.refusals.labels
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[access_middleware(self.verifier, role_of, lambda why: refused(why).inc())])
        app.router.add_get("/v1/routes", self.routes)
        app.router.add_post("/v1/servers", self.announce)
        app.router.add_delete("/v1/servers/{server_id}", self.leave)
        app.router.add_get("/v1/targets", self.targets)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        AdapterRoutes(self.adapters, lambda: self.published.model).add_routes(app)
        AdminRoutes(self.identities, self.verifier, self.authority.leave, self._republish).add_routes(app)
        if self.relay is not None:
            self.relay.add_routes(app)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def tick(self) -> None:
        """One round of upkeep: the record (if any) re-read, silent servers expired."""
        if self._poll is not None:
            self._poll()
        gone = self.authority.expire(self.clock())
        if gone:
            log.info("servers %s missed their heartbeats and left the map", gone)
        self.published = self.authority.snapshot()

    async def _start(self, app: web.Application) -> None:
        self.tick()
        if self.watch is not None:
            self._watch_task = asyncio.create_task(self.watch.run())
        self._task = asyncio.create_task(self._upkeep())

    async def _stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task  # closes its HTTP session
        for task in self._proving.values():
            task.cancel()

    async def _upkeep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    def _republish(self) -> None:
        self.published = self.authority.snapshot()

    async def routes(self, request: web.Request) -> web.Response:
        routes = self.published.model_dump()
        routes["revoked"] = sorted(self.verifier.revoked)
        return web.json_response(routes)

    async def announce(self, request: web.Request) -> web.Response:
        try:
            announcement = await read_announcement(request)
            try:
                admitted = self.identities.admit(announcement)
                listed = self.authority.announce(admitted, self.clock())
            except IdentityRefused as error:
                raise Refusal(403, error.reason, str(error)) from None
            except ModelMismatch as error:
                raise Refusal(409, "model", str(error)) from None
            if self.identities.needs_proof(announcement):
                self._prove(announcement)
        except Refusal as refusal:
            self.metrics_.refusals.labels(refusal.reason).inc()
            return refusal.response()
        self.published = self.authority.snapshot()
        return web.json_response({"version": self.published.version, "listed": listed})

    def _prove(self, announcement: Announcement) -> None:
        """Challenge the announced address (once at a time per id, address and key); list the server ``online``
        as soon as it answers as that server."""
        server, key = announcement.server, announcement.public_key
        assert key is not None
        slot = (server.id, server.url, key)
        if slot not in self._proving or self._proving[slot].done():
            self._proving[slot] = asyncio.create_task(self._challenge(announcement, key))

    async def _challenge(self, announcement: Announcement, key: str) -> None:
        server = announcement.server
        challenge = secrets.token_urlsafe(24)
        try:
            async with asyncio.timeout(CHALLENGE_TIMEOUT):
                status, body = await self._ask_identity(server.id, server.url, challenge)
            if status != 200:
                raise IdentityError(f"HTTP {status}")
            IdentityProof.model_validate_json(body).check(challenge, server.id, server.url, key)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, IdentityError) as error:
            self.metrics_.refusals.labels("address").inc()
            log.warning("server %s did not prove it answers at %s: %s", server.id, server.url, error)
            return
        self.identities.proved(server.id, server.url, key)
        with contextlib.suppress(ModelMismatch):
            self.authority.announce(announcement, self.clock())
        self.published = self.authority.snapshot()

    async def _ask_identity(self, server_id: str, url: str, challenge: str) -> tuple[int, bytes]:
        """`GET <url>/v1/identity?challenge=...`: through the server's tunnel where it is attached to this route map's
        relay at that address (the route map need not reach its own public address), else over the network."""
        attached = self.relay.attached.get(server_id) if self.relay is not None else None
        if attached is not None and attached.url == url:
            reply, body = await self.relay.get(server_id, "/v1/identity", f"challenge={challenge}")  # type: ignore[union-attr]
            return reply.status, body
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self._tls_ca)) if url.startswith("https://") else None
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"{url}/v1/identity", params={"challenge": challenge}) as response:
                return response.status, await response.read()

    async def leave(self, request: web.Request) -> web.Response:
        server_id = request.match_info["server_id"]
        key = self.identities.keys.get(server_id)
        if key is not None:
            try:
                check_leave(request.headers.get(LEAVE_HEADER, ""), server_id, key, time.time())
            except IdentityError as error:
                self.metrics_.refusals.labels("leave").inc()
                return web.json_response({"error": f"server {server_id} leaves only with its own signature: {error}"},
                                         status=403)
        removed = self.authority.leave(server_id)
        self.published = self.authority.snapshot()
        return web.json_response({"removed": removed, "version": self.published.version}, status=200 if removed else 404)

    async def targets(self, request: web.Request) -> web.Response:
        """Every server in the map (any state: draining ones still carry load) in Prometheus' HTTP SD format."""
        return web.json_response(prometheus_targets(self.published))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.authority.ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "waiting for the operator's route map"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return self.metrics_.response(self.published)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmswarm_control.routemap_service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=Path,
                        help="the operator's route map (routes.json of its ConfigMap); without it, announcements only")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=ROUTE_MAP_PORT)
    parser.add_argument("--interval", "--reload-interval", type=float, default=1.0,
                        help="seconds between re-reads of --routes and expiries of silent servers")
    parser.add_argument("--token", help=f"swarm token required on /v1 requests (default: ${TOKEN_ENV})")
    parser.add_argument("--authority-key", help="the public key that signs the swarm's credentials (llmswarm "
                                                f"credentials): their roles are checked (default: ${AUTHORITY_ENV})")
    parser.add_argument("--configmap", help="with --routes: also watch this ConfigMap (its routes.json) through the Kubernetes API "
                                            "with the pod's service account, so a new record counts within a second")
    parser.add_argument("--namespace", help="the ConfigMap's namespace (default: the service account's)")
    parser.add_argument("--tls-ca", help="CA bundle (PEM) to verify https servers against when they prove their address")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM): a public address, relayed "
                                           "sessions included, where no Ingress or load balancer terminates TLS")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="list servers whose announcements are not signed (servers that predate identities), and "
                             "without checking that their address answers as them: anyone with the join credential "
                             "can then speak for any server")
    parser.add_argument("--outside-servers", action="store_true",
                        help="with --routes: also list servers that announce themselves and that the operator did not "
                             "create (an open swarm: anyone holding the join credential adds servers)")
    parser.add_argument("--relay", action="store_true",
                        help="relay for the swarm (llmswarm_core/relay.py): servers behind NAT attach and are listed at "
                             "this route map's address, and clients outside the cluster reach every server through it")
    parser.add_argument("--public-url", help="with --relay: the address outside clients and servers reach this route "
                                             "map at (default: the one each attaching server dialled)")
    limits = AdapterLimits()
    parser.add_argument("--max-adapter-bytes", type=int, default=limits.max_adapter_bytes,
                        help="largest published LoRA adapter (a safetensors file)")
    parser.add_argument("--adapter-store-bytes", type=int, default=limits.max_store_bytes,
                        help="bytes of published adapters the service keeps in all")
    parser.add_argument("--adapter-dir", type=Path,
                        help="keep published adapters in this folder, and serve the ones kept there at start "
                             "(default: in memory only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = token_from_env(args.token)
    authority_key = authority_from_env(args.authority_key)
    configmap = ConfigMapRef.in_cluster(args.configmap, args.namespace) if args.configmap else None
    identities = (IdentityBook(require_signatures=False, check_addresses=False) if args.allow_unsigned
                  else IdentityBook())
    relay = RelayOptions(public_url=args.public_url) if args.relay else None
    service = (RouteMapService.from_record(args.routes, token, args.interval, configmap, identities, args.tls_ca, relay,
                                           args.outside_servers)
               if args.routes else
               RouteMapService.announcements(token=token, interval=args.interval, identities=identities,
                                             tls_ca=args.tls_ca, relay=relay))
    # Without the model's blocks at hand, published adapters are checked for their own consistency here and
    # against the real modules by each server as it loads its span's rows.
    service.verifier.authority_key = authority_key
    service.adapters = AdapterStore(AdapterLimits(args.max_adapter_bytes, args.adapter_store_bytes),
                                    directory=args.adapter_dir)
    web.run_app(service.app(), host=args.host, port=args.port, access_log=None, print=None,
                ssl_context=server_ssl_context(args.tls_cert, args.tls_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
