"""One server's inference session over blocks [start, end), on a WebSocket of its own.

Requests and replies are the typed messages of ``llmswarm_core.wire``; a reply that is an
error raises its ProtocolError, and one that answers another request is a server defect.
"""

from __future__ import annotations

import time
from typing import TypeVar

import torch
from websockets.exceptions import InvalidStatus

from llmswarm.errors import SERVER_FAILURES, SwarmError
from llmswarm.lora import SessionLora
from llmswarm.routing import Hop
from llmswarm.sequence_manager import SwarmClient
from llmswarm.transport import Connection
from llmswarm_core import wire
from llmswarm_core.lora import LORA_TENSOR
from llmswarm_core.wire import DTYPES, ProtocolError

ReplyT = TypeVar("ReplyT", wire.OpenedReply, wire.OutputReply, wire.ClosedReply)
SessionRequest = wire.OpenRequest | wire.StepRequest | wire.CloseRequest


class SpanSession:
    """One server's inference session over blocks [start, end) of the chain."""

    def __init__(self, client: SwarmClient, hop: Hop, max_length: int, batch_size: int, adapter: str | None = None,
                 lora: SessionLora | None = None) -> None:
        """Open the session; `lora` (the client's own LoRA weights) goes with the open, this span's blocks' rows."""
        self.client = client
        self.hop = hop
        self.server_id = hop.server.id
        self.start, self.end = hop.start, hop.end
        self._ids = iter(range(1, 2**31))
        self.position = 0  # tokens this server's session holds
        self._sent_at = 0.0
        ws_url = client.address(hop.server).replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/session"
        config = client.config
        try:
            self.socket = Connection(
                ws_url, open_timeout=config.connect_timeout, max_size=config.max_message_bytes + 64 * 1024,
                headers=config.auth_headers(), ssl_context=client.ssl_context if ws_url.startswith("wss://") else None,
            )
        except InvalidStatus as error:
            if error.response.status_code == 401:
                raise SwarmError(f"server {hop.server.id} refused the swarm token") from None
            raise
        try:
            request_id = self.reserve_request()
            self._send(wire.OpenRequest(kind="open", start=self.start, end=self.end, max_length=max_length,
                                        batch_size=batch_size, wire_dtype=config.wire_dtype, adapter=adapter,
                                        lora=None if lora is None else lora.spec, request_id=request_id),
                       None if lora is None else {LORA_TENSOR: lora.blocks(self.start, self.end)})
            opened, _ = self._receive(request_id, wire.OpenedReply)
        except BaseException:
            self.socket.close()
            raise
        self.session = opened.session
        self.push_key = opened.push_key  # None: the server cannot take pushes

    def reserve_request(self) -> int:
        """A request id: for a request sent now, or for a step that the previous server will push here."""
        return next(self._ids)

    def _send(self, request: SessionRequest, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.socket.send(wire.request_frame(request, tensors))

    def _receive(self, request_id: int, expected: type[ReplyT]) -> tuple[ReplyT, dict[str, torch.Tensor]]:
        data = self.socket.recv(timeout=self.client.config.request_timeout)
        if not isinstance(data, bytes):
            raise ProtocolError("bad_request", "server sent a text frame")
        frame = wire.decode(data, wire.WireLimits(max_tensor_bytes=self.client.config.max_message_bytes))
        reply = wire.parse_reply(frame, expected)
        if reply.request_id != request_id:
            raise ProtocolError("internal", f"reply to request {reply.request_id}, expected {request_id}")
        return reply, frame.tensors

    def push_target(self, request_id: int, then: wire.PushTarget | None) -> wire.PushTarget:
        """Where the previous server hands this hop's input: this session, at its current position;
        `then` goes on from here."""
        if self.push_key is None:
            raise ValueError(f"server {self.server_id} takes no pushes")
        return wire.PushTarget(url=self.hop.server.url, session=self.session, key=self.push_key, request_id=request_id,
                               position=self.position, push=then)

    def send_step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                  push: wire.PushTarget | None = None, request_id: int | None = None,
                  prompts: torch.Tensor | None = None) -> int:
        """Send a step without waiting for its output (see receive_output); returns the request id.
        With `push` (a push_target), the server hands its output on to the next server too; `prompts`
        ([this span's blocks, batch, prefix, hidden]) are deep prompts, with a session's first step only.

        A mask of all ones and the default positions (past, past + 1, ...) are left out: the
        server assumes exactly those, and each costs work on both sides of every hop."""
        wire_dtype = DTYPES[self.client.config.wire_dtype]
        mask = None if attention_mask is None else attention_mask.cpu()
        positions = None if position_ids is None else position_ids.cpu()
        tensors = {"hidden": hidden.to(wire_dtype)}
        if mask is not None and not bool(mask.all()):
            tensors["attention_mask"] = mask.to(torch.int64)
        if positions is not None and not _default_positions(positions, self.position):
            tensors["position_ids"] = positions.to(torch.int64)
        if prompts is not None:
            tensors["prompts"] = prompts.detach().to(wire_dtype)
        request_id = self.reserve_request() if request_id is None else request_id
        self._sent_at = time.perf_counter()
        self._send(wire.StepRequest(kind="step", session=self.session, request_id=request_id, push=push), tensors)
        return request_id

    def receive_output(self, request_id: int, hidden: torch.Tensor, pushed_since: float | None = None) -> tuple[torch.Tensor, bool]:
        """(output, whether the server pushed it on to the next server) of step `request_id` with input `hidden`;
        `pushed_since`: the step was pushed here, and its input was at hand then."""
        reply, tensors = self._receive(request_id, wire.OutputReply)
        output = tensors.get("hidden")
        if output is None or list(output.shape) != list(hidden.shape):
            raise ProtocolError("internal", f"server {self.server_id} returned a malformed output")
        self.position += hidden.shape[1]
        self.client.note_hop(self.server_id, time.perf_counter() - (self._sent_at if pushed_since is None else pushed_since))
        return output.to(hidden.device, hidden.dtype), reply.pushed is True

    def close(self) -> None:
        """End the session on the server (its cache is freed) and the connection."""
        try:
            request_id = self.reserve_request()
            self._send(wire.CloseRequest(kind="close", session=self.session, request_id=request_id))
            self._receive(request_id, wire.ClosedReply)
        except SERVER_FAILURES:
            pass
        finally:
            self.socket.close()

    def abort(self) -> None:
        """Drop the connection without a word (a failed server, or a session that must start over): the server
        ends the session when its connection goes."""
        self.socket.close()


def _default_positions(position_ids: torch.Tensor, past: int) -> bool:
    new = position_ids.shape[-1]
    return bool((position_ids == torch.arange(past, past + new)).all())
