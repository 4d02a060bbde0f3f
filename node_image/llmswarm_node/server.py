"""The block server: HTTP + WebSocket front end over one span of blocks.

Layers, one job each: the handlers here decode and validate (wire.py, sessions.py),
the compute runs on the scheduler's thread (scheduler.py), batched across sessions (batching.py),
through the span (span.py).

Endpoints:
  GET  /healthz       the process is alive
  GET  /readyz        the span is loaded and the server takes requests
  GET  /info          model, span, dtype, throughput, cache use (JSON)
  GET  /metrics       Prometheus metrics
  POST /v1/forward    stateless forward: one frame in, one frame out
  POST /v1/backward   gradients of a forward's inputs (and deep prompts); weights stay frozen
  GET  /v1/weights-digest  SHA-256 of the span's weights
  GET  /v1/session    WebSocket of inference sessions (open / step / close frames)
  GET  /v1/push       WebSocket for the previous server of a client's chain to hand over a step (push.py)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmswarm_core import wire
from llmswarm_core.arch import kv_bytes_per_token, kv_shape
from llmswarm_core.routemap import Announcement, ModelInfo, ServerRecord, ServerState
from llmswarm_core.security import client_ssl_context, server_ssl_context, token_middleware
from llmswarm_core.wire import DTYPES, ProtocolError
from llmswarm_node.metrics import ServerMetrics
from llmswarm_node.push import Pusher
from llmswarm_node.scheduler import BatchOptions, Scheduler
from llmswarm_node.sessions import ServerLimits, Session, SessionTable
from llmswarm_node.span import SpanModel

log = logging.getLogger("llmswarm.node")

HEARTBEAT_SECONDS = 2.0


def kv_bytes_per_token_block(span: SpanModel) -> int:
    """Attention-cache bytes one token takes in one block (keys and values)."""
    return kv_bytes_per_token(*kv_shape(span.source.config), span.dtype.itemsize)


@dataclass
class ServerOptions:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    swarm: str | None = None
    server_id: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    batching: BatchOptions = field(default_factory=BatchOptions)
    token: str | None = None  # the swarm token: required on RPCs, sent to the route map
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # CA bundle to verify an https route map
    drain_timeout: float = 30.0  # seconds open sessions may take to finish after SIGTERM
    push: bool = True  # hand step outputs straight to the next server of a client's chain (push.py)


class BlockServer:
    def __init__(self, span: SpanModel, options: ServerOptions) -> None:
        self.span = span
        self.options = options
        self.limits = options.limits
        self.id = options.server_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.url = options.public_url or ""
        self.state: ServerState = "joining"
        self.metrics = ServerMetrics()
        self.sessions = SessionTable(self.limits, kv_bytes_per_token_block(span))
        self.scheduler = Scheduler(span, options.batching, self.metrics, self.sessions.cycling)
        self.throughput = 0.0
        self.wire_limits = wire.WireLimits(max_tensor_bytes=self.limits.max_message_bytes)
        self._owners = itertools.count(1)
        self._owner_sockets: dict[int, web.WebSocketResponse] = {}  # where a pushed step's reply goes
        self.pusher: Pusher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.span_start.set(span.start)
        self.metrics.span_end.set(span.end)
        self.metrics.kv_cache_limit.set(self.limits.kv_cache_bytes)
        self.metrics.info.labels(options.model_name, str(span.dtype).removeprefix("torch."), self.id).set(1)

    # ---- application -------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_message_bytes + 64 * 1024,
                              middlewares=[token_middleware(self.options.token)])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/info", self.info)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/forward", self.forward)
        app.router.add_post("/v1/backward", self.backward)
        app.router.add_get("/v1/weights-digest", self.weights_digest)
        app.router.add_get("/v1/session", self.session_socket)
        app.router.add_get("/v1/push", self.push_socket)
        app.on_startup.append(self._start_background)
        app.on_cleanup.append(self._stop_background)
        return app

    async def _start_background(self, app: web.Application) -> None:
        self._tasks.append(asyncio.create_task(self._expire_sessions()))
        self.pusher = Pusher(self.options.swarm, self.options.token, self.options.tls_ca)

    def start_announcing(self) -> None:
        """Heartbeat to the route map (once the server is online and knows its URL)."""
        if self.options.swarm:
            self._tasks.append(asyncio.create_task(self._announce_forever()))

    async def _stop_background(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.options.swarm:
            await self._leave()
        if self.pusher is not None:
            await self.pusher.close()
        self.scheduler.shutdown()

    # ---- probes and metadata -----------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.state == "online"
        return web.json_response({"ready": ready, "state": self.state}, status=200 if ready else 503)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.options.model_name, num_blocks=self.span.source.num_blocks, hidden_size=self.span.hidden_size
        )

    def record(self) -> ServerRecord:
        return ServerRecord(
            id=self.id,
            url=self.url,
            start=self.span.start,
            end=self.span.end,
            state=self.state,
            throughput=self.throughput,
            dtype=str(self.span.dtype).removeprefix("torch."),
            cache_tokens_left=self.sessions.tokens_left(self.span.num_blocks),
        )

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "id": self.id,
            "url": self.url,
            "model": self.model_info().model_dump(),
            "start": self.span.start,
            "end": self.span.end,
            "state": self.state,
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "throughput": self.throughput,
            "sessions": len(self.sessions),
            "cache_bytes_used": self.sessions.reserved_bytes,
            "cache_bytes_limit": self.limits.kv_cache_bytes,
            "adapters": sorted(self.span.adapters),
            "quantization": self.span.quantization,
            "limits": self.limits.__dict__,
        })

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.queue_depth.set(self.scheduler.depth)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- validation --------------------------------------------------------------------------------------
    def _check_span(self, start: int, end: int) -> None:
        if not self.span.start <= start < end <= self.span.end:
            raise ProtocolError(
                "bad_request", f"blocks [{start}, {end}) are not inside this server's span [{self.span.start}, {self.span.end})"
            )

    def _inputs(self, tensors: dict[str, torch.Tensor], batch: int | None, past: int, max_new: int,
                extra: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Check hidden [B, T, H], attention_mask [B, past + T], position_ids [B, T]."""
        unknown = set(tensors) - {"hidden", "attention_mask", "position_ids", *extra}
        if unknown:
            raise ProtocolError("bad_request", f"unknown tensors {sorted(unknown)}")
        hidden = tensors.get("hidden")
        if hidden is None:
            raise ProtocolError("bad_request", "missing tensor 'hidden'")
        if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ProtocolError("bad_request", f"'hidden' must be float32, float16 or bfloat16, not {hidden.dtype}")
        if hidden.ndim != 3 or hidden.shape[2] != self.span.hidden_size or hidden.shape[1] < 1:
            raise ProtocolError(
                "bad_request", f"'hidden' must have shape [batch, tokens>=1, {self.span.hidden_size}], got {list(hidden.shape)}"
            )
        b, t = hidden.shape[0], hidden.shape[1]
        if batch is not None and b != batch:
            raise ProtocolError("bad_request", f"'hidden' has batch {b}, the session was opened with {batch}")
        if b < 1 or b > self.limits.max_batch:
            raise ProtocolError("too_large", f"batch {b} is outside [1, {self.limits.max_batch}]")
        if b * t > self.limits.max_tokens_per_request:
            raise ProtocolError("too_large", f"{b * t} tokens in one request, limit {self.limits.max_tokens_per_request}")
        if t > max_new:
            raise ProtocolError("too_large", f"{t} new tokens exceed the {max_new} left in this session")
        mask = tensors.get("attention_mask")
        if mask is not None:
            if mask.dtype not in (torch.int64, torch.int32, torch.bool) or list(mask.shape) != [b, past + t]:
                raise ProtocolError(
                    "bad_request", f"'attention_mask' must be an integer tensor of shape {[b, past + t]}, got "
                    f"{mask.dtype} {list(mask.shape)}"
                )
            mask = mask.to(torch.int64)
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ProtocolError("bad_request", "'attention_mask' must hold only 0 and 1")
        positions = tensors.get("position_ids")
        if positions is not None:
            if positions.dtype not in (torch.int64, torch.int32) or list(positions.shape) != [b, t]:
                raise ProtocolError(
                    "bad_request", f"'position_ids' must be an integer tensor of shape {[b, t]}, got "
                    f"{positions.dtype} {list(positions.shape)}"
                )
            positions = positions.to(torch.int64)
            if bool((positions < 0).any()) or bool((positions >= self.limits.max_length).any()):
                raise ProtocolError("bad_request", f"'position_ids' must lie in [0, {self.limits.max_length})")
        return hidden, mask, positions

    # ---- stateless forward -------------------------------------------------------------------------------
    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.span.adapters:
            raise ProtocolError("bad_request", f"unknown adapter {adapter!r}; this server has {sorted(self.span.adapters)}")

    @staticmethod
    def _prompts(prompts: torch.Tensor | None, blocks: int, hidden: torch.Tensor, longest: int) -> torch.Tensor | None:
        """Deep prompts: [blocks, batch, prefix, hidden] with 0 < prefix <= `longest`."""
        if prompts is None:
            return None
        b, _, h = hidden.shape
        if prompts.dtype not in (torch.float32, torch.float16, torch.bfloat16) or prompts.ndim != 4 or \
                list(prompts.shape[:2]) != [blocks, b] or prompts.shape[3] != h or not 0 < prompts.shape[2] <= longest:
            raise ProtocolError("bad_request", f"'prompts' must be a float tensor [{blocks}, {b}, prefix<={longest}, {h}], "
                                               f"got {prompts.dtype} {list(prompts.shape)}")
        return prompts

    async def forward(self, request: web.Request) -> web.Response:
        return await self._stateless(request, "forward")

    async def backward(self, request: web.Request) -> web.Response:
        return await self._stateless(request, "backward")

    async def _stateless(self, request: web.Request, kind: str) -> web.Response:
        """POST /v1/forward and /v1/backward: one frame in, one frame out (bulk work, after inference)."""
        began = time.perf_counter()
        try:
            if self.state == "joining":
                raise ProtocolError("overloaded", "the server is still starting", retry_after=1.0)
            body = await request.read()
            frame = wire.decode(body, self.wire_limits)
            req = wire.parse_request(frame, (kind,))
            self._check_span(req.start, req.end)
            self._check_adapter(req.adapter)
            extra = ("prompts", "grad_output") if kind == "backward" else ("prompts",)
            hidden, mask, positions = self._inputs(frame.tensors, None, 0, self.limits.max_length, extra)
            prompts = self._prompts(frame.tensors.get("prompts"), req.end - req.start, hidden, hidden.shape[1])
            out_dtype = DTYPES[req.wire_dtype]
            if kind == "backward":
                grad_output = frame.tensors.get("grad_output")
                if grad_output is None or grad_output.shape != hidden.shape or not grad_output.is_floating_point():
                    raise ProtocolError("bad_request", f"'grad_output' must be a float tensor shaped like 'hidden' {list(hidden.shape)}")
                grad_hidden, grad_prompts = await self.scheduler.forward(req.start, req.end, hidden, mask, positions, prompts,
                                                                         req.adapter, grad_output)
                tensors = {"grad_hidden": grad_hidden.to(out_dtype)}
                if grad_prompts is not None:
                    tensors["grad_prompts"] = grad_prompts.to(out_dtype)
                reply = wire.encode({"kind": "gradients", "request_id": req.request_id}, tensors)
            else:
                output = await self.scheduler.forward(req.start, req.end, hidden, mask, positions, prompts, req.adapter)
                reply = wire.encode({"kind": "output", "request_id": req.request_id}, {"hidden": output.to(out_dtype)})
            self.metrics.tokens.labels(kind).inc(hidden.shape[0] * hidden.shape[1])
            self._count(kind, "ok", began)
            return web.Response(body=reply, content_type="application/octet-stream")
        except ProtocolError as error:
            self._count(kind, error.code, began)
            headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after is not None else None
            return web.Response(body=wire.encode(error.to_header()), status=error.http_status,
                                content_type="application/octet-stream", headers=headers)
        except Exception as error:
            log.exception("%s failed", kind)
            self._count(kind, "internal", began)
            failure = ProtocolError("internal", f"{type(error).__name__}: {error}")
            return web.Response(body=wire.encode(failure.to_header()), status=500,
                                content_type="application/octet-stream")

    async def weights_digest(self, request: web.Request) -> web.Response:
        """SHA-256 of the span's weights, to check that training through the swarm leaves them unchanged."""
        digest = await asyncio.to_thread(self.span.weights_digest)
        return web.json_response({"sha256": digest, "start": self.span.start, "end": self.span.end})

    def _count(self, kind: str, status: str, began: float) -> None:
        self.metrics.requests.labels(kind, status).inc()
        self.metrics.latency.labels(kind).observe(time.perf_counter() - began)

    # ---- inference sessions ------------------------------------------------------------------------------
    async def session_socket(self, request: web.Request) -> web.WebSocketResponse:
        # No heartbeat: clients read only in request/reply turns (llmswarm/transport.py), so an idle one could
        # not answer pings. A vanished client's sessions are freed by the idle timeout or when the socket closes.
        socket_ = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes + 64 * 1024)
        await socket_.prepare(request)
        owner = next(self._owners)
        self._owner_sockets[owner] = socket_
        try:
            async for message in socket_:
                if message.type == aiohttp.WSMsgType.BINARY:
                    reply = await self._session_message(owner, message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    reply = wire.encode(ProtocolError("bad_request", "send binary frames, not text").to_header())
                else:
                    break
                await socket_.send_bytes(reply)
        finally:
            del self._owner_sockets[owner]
            freed = self.sessions.close_owner(owner)
            if freed:
                log.info("connection %d closed, freed %d session(s)", owner, freed)
            self._update_session_gauges()
        return socket_

    async def _session_message(self, owner: int, data: bytes) -> bytes:
        began = time.perf_counter()
        kind = "session"
        try:
            frame = wire.decode(data, self.wire_limits)
            req = wire.parse_request(frame, ("open", "step", "close"))
            kind = req.kind
            if isinstance(req, wire.OpenRequest):
                reply = self._open(owner, req)
            elif isinstance(req, wire.StepRequest):
                reply = await self._step(owner, req, frame.tensors)
            else:
                self.sessions.close(owner, req.session)
                reply = wire.encode({"kind": "closed", "session": req.session, "request_id": req.request_id})
            self._count_later(kind, "ok", began)
            return reply
        except Exception as error:  # noqa: BLE001 - answered as an error frame; the connection goes on
            reply, status = _error_reply(error, _request_id(data), kind)
            self._count_later(kind, status, began)
            return reply

    def _count_later(self, kind: str, status: str, began: float) -> None:
        """Metrics of a session message, updated once its reply is on its way (not on every hop's critical path)."""
        elapsed = time.perf_counter() - began
        asyncio.get_running_loop().call_soon(self._record_session_message, kind, status, elapsed)

    def _record_session_message(self, kind: str, status: str, elapsed: float) -> None:
        self.metrics.requests.labels(kind, status).inc()
        self.metrics.latency.labels(kind).observe(elapsed)
        self._update_session_gauges()

    def _open(self, owner: int, req: wire.OpenRequest) -> bytes:
        if self.state != "online":
            raise ProtocolError("overloaded", f"the server is {self.state}, not taking new sessions", retry_after=1.0)
        self._check_span(req.start, req.end)
        self._check_adapter(req.adapter)
        session = self.sessions.open(
            owner, req.start, req.end, req.batch_size, req.max_length, req.wire_dtype,
            self.span.new_cache(req.start, req.end), req.adapter,
        )
        return wire.encode({"kind": "opened", "session": session.id, "push_key": session.push_key,
                            "request_id": req.request_id})

    async def _step(self, owner: int, req: wire.StepRequest, tensors: dict[str, torch.Tensor]) -> bytes:
        return await self._run_step(self.sessions.get(owner, req.session), req.request_id, tensors, req.push)

    async def _run_step(self, session: Session, request_id: int | None, tensors: dict[str, torch.Tensor],
                        push: wire.PushTarget | None) -> bytes:
        """One step of `session`; with `push`, its output also goes on to the next server of the chain."""
        if session.stepping:
            raise ProtocolError("bad_request", f"session {session.id} is already running a step")
        session.stepping = True
        try:
            session.note_step(time.monotonic())
            hidden, mask, positions = self._inputs(
                tensors, session.batch_size, session.position, session.max_length - session.position, extra=("prompts",)
            )
            prompts = self._session_prompts(tensors.get("prompts"), session, hidden)
            try:
                output = await self.scheduler.step(session, hidden, mask, positions, prompts)
            except Exception:
                self._drop_broken(session)
                raise
            output = output.to(DTYPES[session.wire_dtype])
            session.position += hidden.shape[1]
        finally:
            session.stepping = False
        header: dict[str, object] = {"kind": "output", "session": session.id, "request_id": request_id}
        if push is not None:
            header["pushed"] = await self._push(push, output, mask, positions)
        asyncio.get_running_loop().call_soon(self.metrics.tokens.labels("inference").inc, hidden.shape[0] * hidden.shape[1])
        return wire.encode(header, {"hidden": output})

    def _session_prompts(self, prompts: torch.Tensor | None, session: Session, hidden: torch.Tensor) -> torch.Tensor | None:
        """Deep prompts of a session's first step, prefix within the step and its first prefill chunk; they shape
        the cached keys and values of the first `prefix` positions for good."""
        if prompts is not None and session.position != 0:
            raise ProtocolError("bad_request", "deep prompts come with a session's first step only")
        longest = min(hidden.shape[1], self.options.batching.prefill_chunk)
        return self._prompts(prompts, session.end - session.start, hidden, longest)

    async def _push(self, target: wire.PushTarget, output: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor | None) -> bool:
        """Hand a step's output to the next server (the client sends it there itself if this returns False)."""
        tensors = {"hidden": output}
        if mask is not None:
            tensors["attention_mask"] = mask
        if positions is not None:
            tensors["position_ids"] = positions
        header = {"kind": "push", **target.model_dump(exclude_none=True)}
        del header["url"]
        pushed = self.pusher is not None and self.options.push and await self.pusher.push(target.url, wire.encode(header, tensors))
        asyncio.get_running_loop().call_soon(self.metrics.pushes.labels("ok" if pushed else "failed").inc)
        return pushed

    async def push_socket(self, request: web.Request) -> web.WebSocketResponse:
        """Steps handed over by the previous server of a client's chain; their replies go to the client."""
        socket_ = web.WebSocketResponse(max_msg_size=self.limits.max_message_bytes + 64 * 1024)
        await socket_.prepare(request)
        running: set[asyncio.Task[None]] = set()
        async for message in socket_:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            # One task each: steps of different sessions arrive on the same connection from the same server,
            # and must be free to share a pass (or to wait) here instead of queueing behind each other.
            task = asyncio.create_task(self._answer_push(socket_, message.data))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        return socket_

    async def _answer_push(self, socket_: web.WebSocketResponse, data: bytes) -> None:
        refusal = await self._pushed_step(data)
        if refusal is not None and not socket_.closed:
            await socket_.send_bytes(refusal)

    async def _pushed_step(self, data: bytes) -> bytes | None:
        """Run a pushed step and answer its client; returns a refusal for the pusher where no client can be told."""
        began = time.perf_counter()
        try:
            frame = wire.decode(data, self.wire_limits)
            req = wire.parse_request(frame, ("push",))
            session = self.sessions.pushed(req.session, req.key)
            client = self._owner_sockets.get(session.owner)
        except ProtocolError as error:
            self.metrics.pushes_received.labels(error.code).inc()
            return wire.encode(error.to_header())
        try:
            if req.position != session.position:
                raise ProtocolError("bad_request", f"a push for position {req.position}, the session holds "
                                                   f"{session.position} tokens")
            reply = await self._run_step(session, req.request_id, frame.tensors, req.push)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - answered to the client as an error frame
            reply, status = _error_reply(error, req.request_id, "pushed step")
        self._count_later("step", status, began)
        asyncio.get_running_loop().call_soon(lambda: self.metrics.pushes_received.labels(status).inc())  # after the reply
        if client is not None and not client.closed:
            try:
                await client.send_bytes(reply)
            except (ConnectionError, RuntimeError) as error:
                log.info("the client of session %d left before its pushed step's reply: %s", session.id, error)
        return None

    def _drop_broken(self, session: Session) -> None:
        """A step that failed inside the model may have half-written the cache: end the session."""
        try:
            self.sessions.close(session.owner, session.id)
        except ProtocolError:
            pass

    def _update_session_gauges(self) -> None:
        self.metrics.active_sessions.set(len(self.sessions))
        self.metrics.kv_cache_used.set(self.sessions.reserved_bytes)

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.limits.session_idle_timeout / 2))
            expired = self.sessions.expire()
            if expired:
                log.info("expired idle sessions %s", expired)
                self._update_session_gauges()

    # ---- route map ---------------------------------------------------------------------------------------
    async def _announce(self, http: aiohttp.ClientSession) -> None:
        announcement = Announcement(model=self.model_info(), server=self.record(), ttl=HEARTBEAT_SECONDS * 5)
        async with http.post(f"{self.options.swarm}/v1/servers", json=announcement.model_dump()) as response:
            if response.status >= 400:
                log.warning("route map refused the announcement: %s %s", response.status, await response.text())

    def _route_map_session(self, timeout: float) -> aiohttp.ClientSession:
        connector = None
        if self.options.swarm and self.options.swarm.startswith("https://"):
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.options.tls_ca))
        headers = {"Authorization": f"Bearer {self.options.token}"} if self.options.token else None
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector, headers=headers)

    async def _announce_forever(self) -> None:
        async with self._route_map_session(5) as http:
            while True:
                try:
                    await self._announce(http)
                except (TimeoutError, aiohttp.ClientError, OSError) as error:
                    log.warning("cannot reach the route map at %s: %s", self.options.swarm, error)
                await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _leave(self) -> None:
        self.state = "draining"
        try:
            async with self._route_map_session(3) as http:
                async with http.delete(f"{self.options.swarm}/v1/servers/{self.id}"):
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    async def drain(self) -> None:
        """Leave the route map's online set, let open sessions finish (up to drain_timeout), then return."""
        self.state = "draining"
        log.info("draining: %d open session(s), up to %.0f s", len(self.sessions), self.options.drain_timeout)
        if self.options.swarm:
            try:
                async with self._route_map_session(3) as http:
                    await self._announce(http)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
        deadline = time.monotonic() + self.options.drain_timeout
        while len(self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if len(self.sessions):
            log.warning("drain timeout: closing %d session(s); their clients fail over", len(self.sessions))


def _error_reply(error: Exception, request_id: int | None, what: str) -> tuple[bytes, str]:
    """The error frame answering a failed request, and its status for the metrics (unexpected errors are logged)."""
    if not isinstance(error, ProtocolError):
        log.exception("%s failed", what)
        error = ProtocolError("internal", f"{type(error).__name__}: {error}")
    return wire.encode({**error.to_header(), "request_id": request_id}), error.code


def _request_id(data: bytes) -> int | None:
    try:
        value = wire.decode(data).header.get("request_id")
    except ProtocolError:
        return None
    return value if isinstance(value, int) else None


async def serve(server: BlockServer, host: str, port: int, stop: asyncio.Event | None = None) -> None:
    """Run the server until `stop` is set (then drain) or until cancelled (no drain)."""
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    context = server_ssl_context(server.options.tls_cert, server.options.tls_key)
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    bound_port = runner.addresses[0][1]
    if not server.url:
        server.url = f"{'https' if context else 'http'}://{host}:{bound_port}"
    server.state = "online"
    server.start_announcing()
    print(f"llmswarm-node {server.id} serving blocks [{server.span.start}, {server.span.end}) at {server.url}",
          flush=True)
    try:
        await (stop or asyncio.Event()).wait()
        await server.drain()
    finally:
        await runner.cleanup()
