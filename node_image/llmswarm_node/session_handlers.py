"""The block server's WebSocket routes: inference sessions (``/v1/session``) and pushed steps (``/v1/push``).

A session connection carries open / step / close frames, answered in order; a failed one
is answered by replies.error_reply and the connection goes on. A step may name the rest
of the client's chain (``push``): its output then also goes to the next server (push.py),
whose ``/v1/push`` runs it and answers the client on the client's own session connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import torch
from aiohttp import web

from llmswarm_core import wire
from llmswarm_core.wire import DTYPES, ProtocolError
from llmswarm_node import validation
from llmswarm_node.context import Node
from llmswarm_node.lora import ClientLora, published_adapter, session_lora
from llmswarm_node.push import Pusher
from llmswarm_node.replies import error_reply, request_id_of
from llmswarm_node.sessions import Session

log = logging.getLogger("llmswarm.node")

FRAME_SLACK = 64 * 1024  # bytes a message may hold beyond its tensors (header, framing)
TEXT_REFUSAL = error_reply(ProtocolError("bad_request", "send binary frames, not text"), None, "session")[0]


class SessionHandlers:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.pusher: Pusher | None = None  # set once the server runs (push.py needs an event loop)
        self._owners = itertools.count(1)
        self._owner_sockets: dict[int, web.WebSocketResponse] = {}  # where a pushed step's reply goes
        self._owner_addresses: dict[int, str] = {}  # the client's address (sessions per address are limited)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/session", self.session_socket)
        app.router.add_get("/v1/push", self.push_socket)

    def _socket(self) -> web.WebSocketResponse:
        return web.WebSocketResponse(max_msg_size=self.node.limits.max_message_bytes + FRAME_SLACK)

    async def _messages(self, socket_: web.WebSocketResponse, idle: Callable[[], bool],
                        what: str) -> AsyncIterator[bytes | None]:
        """The binary messages of `socket_` (None for a text one, which gets an error frame) until it closes, or
        until it has sent nothing for idle_connection_timeout seconds while `idle()` says it holds nothing.

        A timer checks for silence (rather than a timeout on every read, which would cost each step)."""
        loop = asyncio.get_running_loop()
        timeout = self.node.limits.idle_connection_timeout
        heard = loop.time()
        closing: list[asyncio.Task[bool]] = []

        def check() -> None:
            nonlocal timer
            quiet = loop.time() - heard
            if socket_.closed:
                return
            if quiet >= timeout and idle():
                log.info("closing a %s connection silent for %.0f s", what, quiet)
                closing.append(asyncio.ensure_future(socket_.close(message=b"idle")))
                return
            timer = loop.call_later(timeout - quiet if quiet < timeout else timeout, check)

        timer = loop.call_later(timeout, check)
        try:
            async for message in socket_:
                heard = loop.time()
                if message.type == aiohttp.WSMsgType.BINARY:
                    yield message.data
                elif message.type == aiohttp.WSMsgType.TEXT:
                    yield None
                else:
                    return
        finally:
            timer.cancel()

    async def _send(self, socket_: web.WebSocketResponse, data: bytes) -> bool:
        """Send `data`, unless the peer has left or stopped reading (for idle_connection_timeout seconds)."""
        try:
            async with asyncio.timeout(self.node.limits.idle_connection_timeout):
                await socket_.send_bytes(data)
        except (TimeoutError, ConnectionError, RuntimeError) as error:
            log.info("a peer that left or stopped reading missed a reply: %r", error)
            return False
        return True

    # ---- inference sessions ------------------------------------------------------------------------------
    async def session_socket(self, request: web.Request) -> web.WebSocketResponse:
        # No heartbeat: clients read only in request/reply turns (llmswarm/transport.py), so an idle one could
        # not answer pings. A vanished client's sessions are freed by the idle timeout or when the socket closes.
        socket_ = self._socket()
        await socket_.prepare(request)
        owner = next(self._owners)
        self._owner_sockets[owner] = socket_
        self._owner_addresses[owner] = request.remote or ""
        sessions = self.node.sessions
        try:
            async for data in self._messages(socket_, lambda: sessions.held_by(owner) == 0, "session"):
                reply = TEXT_REFUSAL if data is None else await self._session_message(owner, data)
                if not await self._send(socket_, reply):
                    break
        finally:
            del self._owner_sockets[owner]
            del self._owner_addresses[owner]
            freed = self.node.sessions.close_owner(owner)
            if freed:
                log.info("connection %d closed, freed %d session(s)", owner, freed)
            self.node.update_session_gauges()
        return socket_

    async def _session_message(self, owner: int, data: bytes) -> bytes:
        began = time.perf_counter()
        kind = "session"
        try:
            frame = wire.decode(data, self.node.wire_limits)
            req = wire.parse_request(frame, ("open", "step", "close"))
            kind = req.kind
            if isinstance(req, wire.OpenRequest):
                req, published = await published_adapter(self.node.lora_store, self.node.span.loaded,
                                                         self.node.span.adapters, self.node.options.lora,
                                                         self.node.options, req)
                reply = self._open(owner, req, frame.tensors, published)
            elif isinstance(req, wire.StepRequest):
                reply = await self._run_step(self.node.sessions.get(owner, req.session), req.request_id, frame.tensors,
                                             req.push)
            else:
                self.node.sessions.close(owner, req.session)
                reply = wire.reply_frame(wire.ClosedReply(session=req.session, request_id=req.request_id))
            self.node.count_later(kind, "ok", began)
            return reply
        except Exception as error:  # noqa: BLE001 - answered as an error frame; the connection goes on
            reply, failure = error_reply(error, request_id_of(data), kind)
            self.node.count_later(kind, failure.code, began)
            return reply

    def _open(self, owner: int, req: wire.OpenRequest, tensors: dict[str, torch.Tensor],
              published: ClientLora | None = None) -> bytes:
        node = self.node
        if node.state != "online":
            raise ProtocolError("overloaded", f"the server is {node.state}, not taking new sessions", retry_after=1.0)
        validation.check_open(node.span, req)
        own = session_lora(node.span.loaded, node.options.lora, node.lora_store, req.lora, req.adapter, req.start,
                           req.end, tensors)
        lora = published or own
        session = node.sessions.open(
            owner, req.start, req.end, req.batch_size, req.max_length, req.wire_dtype,
            node.span.new_cache(req.start, req.end), req.adapter, self._owner_addresses.get(owner, ""),
        )
        if lora is not None:
            session.lora = lora
            if published is None:  # a published adapter is kept once for every session that uses it
                node.lora_store.hold(lora)
        return wire.reply_frame(wire.OpenedReply(session=session.id, push_key=session.push_key, request_id=req.request_id))

    async def _run_step(self, session: Session, request_id: int | None, tensors: dict[str, torch.Tensor],
                        push: wire.PushTarget | None) -> bytes:
        """One step of `session`; with `push`, its output also goes on to the next server of the chain."""
        node = self.node
        if session.stepping:
            raise ProtocolError("bad_request", f"session {session.id} is already running a step")
        session.stepping = True
        try:
            session.note_step(time.monotonic())
            inputs = validation.step_inputs(node.span, node.limits, session, tensors, node.options.batching.prefill_chunk)
            try:
                output = await node.scheduler.step(session, inputs.hidden, inputs.attention_mask, inputs.position_ids,
                                                   inputs.prompts)
            except ProtocolError:
                raise  # refused before it ran (memory.py): the cache is as it was
            except Exception:
                self._drop_broken(session)
                raise
            output = output.to(DTYPES[session.wire_dtype])
            session.position += inputs.hidden.shape[1]
        finally:
            session.stepping = False
        pushed = None if push is None else await self._push(push, output, inputs.attention_mask, inputs.position_ids)
        asyncio.get_running_loop().call_soon(node.metrics.tokens.labels("inference").inc, inputs.tokens)
        return wire.reply_frame(wire.OutputReply(session=session.id, request_id=request_id, pushed=pushed),
                                {"hidden": output})

    def _drop_broken(self, session: Session) -> None:
        """A step that failed inside the model may have half-written the cache: end the session."""
        try:
            self.node.sessions.close(session.owner, session.id)
        except ProtocolError:
            pass

    # ---- push --------------------------------------------------------------------------------------------
    async def _push(self, target: wire.PushTarget, output: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor | None) -> bool:
        """Hand a step's output to the next server (the client sends it there itself if this returns False)."""
        tensors = {"hidden": output}
        if mask is not None:
            tensors["attention_mask"] = mask
        if positions is not None:
            tensors["position_ids"] = positions
        request = wire.PushRequest(kind="push", session=target.session, key=target.key, request_id=target.request_id,
                                   position=target.position, push=target.push)
        pushed = (self.pusher is not None and self.node.options.push
                  and await self.pusher.push(target.url, wire.request_frame(request, tensors)))
        asyncio.get_running_loop().call_soon(self.node.metrics.pushes.labels("ok" if pushed else "failed").inc)
        return pushed

    async def push_socket(self, request: web.Request) -> web.WebSocketResponse:
        """Steps handed over by the previous server of a client's chain; their replies go to the client."""
        socket_ = self._socket()
        await socket_.prepare(request)
        running: set[asyncio.Task[None]] = set()
        async for data in self._messages(socket_, lambda: not running, "push"):
            if data is None or len(running) >= self.node.limits.max_sessions:
                # A session runs one step at a time: more pushed steps at once than sessions are not a server's.
                refusal = TEXT_REFUSAL if data is None else error_reply(ProtocolError(
                    "overloaded", f"{len(running)} pushed steps are running on this connection", retry_after=1.0),
                    None, "push")[0]
                await self._send(socket_, refusal)
                continue
            # One task each: steps of different sessions arrive on the same connection from the same server,
            # and must be free to share a pass (or to wait) here instead of queueing behind each other.
            task = asyncio.create_task(self._answer_push(socket_, data))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        return socket_

    async def _answer_push(self, socket_: web.WebSocketResponse, data: bytes) -> None:
        refusal = await self._pushed_step(data)
        if refusal is not None and not socket_.closed:
            await self._send(socket_, refusal)

    async def _pushed_step(self, data: bytes) -> bytes | None:
        """Run a pushed step and answer its client; returns a refusal for the pusher where no client can be told."""
        began = time.perf_counter()
        node = self.node
        try:
            frame = wire.decode(data, node.wire_limits)
            req = wire.parse_request(frame, ("push",))
            session = node.sessions.pushed(req.session, req.key)
            client = self._owner_sockets.get(session.owner)
        except Exception as error:  # noqa: BLE001 - refused on the push connection: no client can be told
            refusal, failure = error_reply(error, None, "push")
            node.metrics.pushes_received.labels(failure.code).inc()
            return refusal
        try:
            validation.check_push_position(req.position, session)
            reply = await self._run_step(session, req.request_id, frame.tensors, req.push)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - answered to the client as an error frame
            reply, failure = error_reply(error, req.request_id, "pushed step")
            status = failure.code
        node.count_later("step", status, began)
        asyncio.get_running_loop().call_soon(lambda: node.metrics.pushes_received.labels(status).inc())  # after the reply
        if client is not None and not client.closed:
            await self._send(client, reply)
        return None
