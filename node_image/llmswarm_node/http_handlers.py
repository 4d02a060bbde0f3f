"""The block server's HTTP routes: probes, metadata, metrics, and stateless forward and backward.

Each handler decodes its frame, checks it (validation.py), submits the work to the
scheduler and encodes a typed reply; a failure is answered by replies.error_reply with
its HTTP status (and ``Retry-After`` where the client should come back later).
"""

from __future__ import annotations

import asyncio
import re
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmswarm_core import wire
from llmswarm_core.lora import GRAD_TENSOR
from llmswarm_core.routemap import IdentityProof
from llmswarm_core.wire import DTYPES, ProtocolError
from llmswarm_node import validation
from llmswarm_node.admission import InFlight
from llmswarm_node.context import Node
from llmswarm_node.lora import ClientLora, published_adapter, request_lora
from llmswarm_node.replies import error_reply
from llmswarm_node.session_handlers import FRAME_SLACK

FRAME = "application/octet-stream"
CHALLENGE = re.compile(r"[A-Za-z0-9_-]{16,128}")


class HttpHandlers:
    def __init__(self, node: Node) -> None:
        self.node = node
        limits = node.limits
        self.in_flight = InFlight(limits.max_queued_requests, limits.max_queued_bytes)
        self._digesting = asyncio.Lock()  # one weights digest at a time (span.py caches it)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/info", self.info)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/forward", self.forward)
        app.router.add_post("/v1/backward", self.backward)
        app.router.add_get("/v1/weights-digest", self.weights_digest)
        app.router.add_get("/v1/identity", self.identity)

    # ---- probes and metadata -----------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.node.state == "online"
        return web.json_response({"ready": ready, "state": self.node.state}, status=200 if ready else 503)

    async def identity(self, request: web.Request) -> web.Response:
        """Proof that this address is this server: the route map's challenge, signed with the server's key."""
        challenge = request.query.get("challenge", "")
        if not CHALLENGE.fullmatch(challenge):
            return web.json_response({"error": "challenge must be 16 to 128 characters of A-Z a-z 0-9 _ -"}, status=400)
        node = self.node
        return web.json_response(IdentityProof.answer(node.identity, node.id, challenge, node.url).model_dump())

    async def info(self, request: web.Request) -> web.Response:
        node, span = self.node, self.node.span
        return web.json_response({
            "id": node.id,
            "url": node.url,
            "model": node.model_info().model_dump(),
            "start": span.start,
            "end": span.end,
            "state": node.state,
            "dtype": node.dtype_name,
            "throughput": node.throughput,
            "sessions": len(node.sessions),
            "cache_bytes_used": node.sessions.reserved_bytes,
            "cache_bytes_limit": node.limits.kv_cache_bytes,
            "adapters": sorted(span.adapters),
            "quantization": span.quantization,
            "limits": node.limits.__dict__,
        })

    async def prometheus(self, request: web.Request) -> web.Response:
        self.node.metrics.queue_depth.set(self.node.scheduler.depth)
        body = generate_latest(self.node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def weights_digest(self, request: web.Request) -> web.Response:
        """SHA-256 of the span's weights, to check that training through the swarm leaves them unchanged."""
        span = self.node.span
        async with self._digesting:
            digest = await asyncio.to_thread(span.weights_digest)
        return web.json_response({"sha256": digest, "start": span.start, "end": span.end})

    # ---- stateless forward and backward ------------------------------------------------------------------
    async def forward(self, request: web.Request) -> web.Response:
        return await self._stateless(request, "forward")

    async def backward(self, request: web.Request) -> web.Response:
        return await self._stateless(request, "backward")

    async def _stateless(self, request: web.Request, kind: str) -> web.Response:
        """POST /v1/forward and /v1/backward: one frame in, one frame out (bulk work, after inference)."""
        began = time.perf_counter()
        node = self.node
        try:
            if node.state == "joining":
                raise ProtocolError("overloaded", "the server is still starting", retry_after=1.0)
            size = self._declared_size(request)
            with self.in_flight.holding(size):  # the body, queued and run: within --max-queued-requests/-bytes
                frame = wire.decode(await self._body(request), node.wire_limits)
                req = wire.parse_request(frame, (kind,))
                req, published = await published_adapter(node.lora_store, node.span.loaded, node.span.adapters,
                                                          node.options.lora, node.options, req)
                own = request_lora(node.span.loaded, node.options.lora, node.lora_store, req.lora, req.adapter,
                                   req.start, req.end, frame.tensors)
                lora = published or own
                inputs = validation.stateless_inputs(node.span, node.limits, req, frame.tensors)
                reply = await self._run(req, inputs, lora)
        except Exception as error:  # noqa: BLE001 - answered as an error frame with its HTTP status
            body, failure = error_reply(error, None, kind)
            node.count(kind, failure.code, began)
            headers = {"Retry-After": str(max(1, round(failure.retry_after)))} if failure.retry_after is not None else None
            return web.Response(body=body, status=failure.http_status, content_type=FRAME, headers=headers)
        node.metrics.tokens.labels(kind).inc(inputs.tokens)
        node.count(kind, "ok", began)
        return web.Response(body=reply, content_type=FRAME)

    def _declared_size(self, request: web.Request) -> int:
        """The bytes a request's body will take: as declared, refused at once where over the message limit."""
        most = self.node.limits.max_message_bytes + FRAME_SLACK
        declared = request.content_length
        if declared is not None and declared > most:
            raise ProtocolError("too_large", f"a body of {declared} bytes, the limit is {most}")
        return most if declared is None else declared

    async def _body(self, request: web.Request) -> bytes:
        timeout = self.node.limits.body_timeout
        try:
            async with asyncio.timeout(timeout):
                return await request.read()
        except TimeoutError:
            raise ProtocolError("bad_request", f"the request body did not arrive within {timeout:.0f} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError("too_large", "the body is larger than this server's message limit") from None

    async def _run(self, req: wire.ForwardRequest | wire.BackwardRequest, inputs: validation.Inputs,
                   lora: ClientLora | None) -> bytes:
        out_dtype = DTYPES[req.wire_dtype]
        scheduler = self.node.scheduler
        if inputs.grad_output is not None:
            grad_hidden, grad_prompts = await scheduler.forward(
                req.start, req.end, inputs.hidden, inputs.attention_mask, inputs.position_ids, inputs.prompts,
                req.adapter, inputs.grad_output, lora)
            tensors = {"grad_hidden": grad_hidden.to(out_dtype)}
            if grad_prompts is not None:
                tensors["grad_prompts"] = grad_prompts.to(out_dtype)
            if lora is not None and lora.grad is not None:
                tensors[GRAD_TENSOR] = lora.grad.float()  # float32 whatever the wire dtype: it updates weights
            return wire.reply_frame(wire.GradientsReply(request_id=req.request_id), tensors)
        output = await scheduler.forward(req.start, req.end, inputs.hidden, inputs.attention_mask, inputs.position_ids,
                                         inputs.prompts, req.adapter, lora=lora)
        return wire.reply_frame(wire.OutputReply(request_id=req.request_id), {"hidden": output.to(out_dtype)})
