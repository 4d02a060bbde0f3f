"""Stateless forward and backward through the swarm's blocks (no cache): for scoring and training.

Both retry like inference sessions: a failing server is avoided and its blocks routed again.
Forward keeps each hop's inputs (a Trace) so that backward can go back through the same hops;
when a hop's server is gone by then, its blocks are recomputed on other servers first (Petals'
``sequential_autograd``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch

from llmswarm.errors import SERVER_FAILURES, SwarmError
from llmswarm.routing import Hop, NoRoute
from llmswarm.sequence_manager import SwarmClient
from llmswarm_core import wire
from llmswarm_core.wire import DTYPES, ProtocolError

ReplyT = TypeVar("ReplyT", wire.OutputReply, wire.GradientsReply)


@dataclass
class Trace:
    """What a stateless forward went through: each hop and the hidden states it received (for backward)."""

    hops: list[Hop] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)


class RemoteSequential:
    """Stateless forward and backward through blocks (no cache): for scoring and training.

    `prompts` are deep prompts [num_blocks, batch, prefix, hidden]; each hop gets its blocks' slice.
    """

    def __init__(self, client: SwarmClient, num_blocks: int, adapter: str | None = None) -> None:
        self.client = client
        self.num_blocks = num_blocks
        self.adapter = adapter

    def _call(self, request: wire.ForwardRequest | wire.BackwardRequest, hop: Hop,
              tensors: dict[str, torch.Tensor | None], expected: type[ReplyT]) -> dict[str, torch.Tensor]:
        config = self.client.config
        wire_dtype = DTYPES[config.wire_dtype]
        payload = {}
        for name, tensor in tensors.items():
            if tensor is not None:
                payload[name] = tensor.to(wire_dtype) if tensor.is_floating_point() else tensor.to(torch.int64)
        response = self.client.http.post(
            f"{hop.server.url}/v1/{request.kind}", data=wire.request_frame(request, payload), timeout=config.request_timeout,
            headers={"Content-Type": "application/octet-stream"}, verify=self.client.verify,
        )
        if response.status_code == 401:
            raise SwarmError(f"server {hop.server.id} refused the swarm token")
        frame = wire.decode(response.content, wire.WireLimits(max_tensor_bytes=config.max_message_bytes))
        wire.parse_reply(frame, expected)
        return frame.tensors

    def _forward_hop(self, hop: Hop, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, prompts: torch.Tensor | None) -> torch.Tensor:
        deep = None if prompts is None else prompts[hop.start:hop.end]
        request = wire.ForwardRequest(kind="forward", start=hop.start, end=hop.end, wire_dtype=self.client.config.wire_dtype,
                                      adapter=self.adapter)
        tensors = self._call(request, hop, {"hidden": hidden, "attention_mask": attention_mask,
                                            "position_ids": position_ids, "prompts": deep}, wire.OutputReply)
        output = tensors.get("hidden")
        if output is None or list(output.shape) != list(hidden.shape):
            raise ProtocolError("internal", f"server {hop.server.id} returned a malformed output")
        return output.to(hidden.dtype)

    def _backward_hop(self, hop: Hop, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        deep = None if prompts is None else prompts[hop.start:hop.end]
        request = wire.BackwardRequest(kind="backward", start=hop.start, end=hop.end,
                                       wire_dtype=self.client.config.wire_dtype, adapter=self.adapter)
        tensors = self._call(request, hop, {"hidden": hidden, "grad_output": grad_output, "attention_mask": attention_mask,
                                            "position_ids": position_ids, "prompts": deep}, wire.GradientsReply)
        grad_hidden = tensors.get("grad_hidden")
        grad_prompts = tensors.get("grad_prompts")
        if grad_hidden is None or grad_hidden.shape != hidden.shape or (deep is not None and (
                grad_prompts is None or grad_prompts.shape != deep.shape)):
            raise ProtocolError("internal", f"server {hop.server.id} returned malformed gradients")
        return grad_hidden.to(hidden.dtype), None if grad_prompts is None else grad_prompts.to(hidden.dtype)

    def _retry(self, error: Exception, hop: Hop, attempt: int, what: str) -> int:
        if isinstance(error, ProtocolError) and not error.retryable:
            raise error
        attempt += 1
        if attempt > self.client.config.max_retries:
            raise SwarmError(f"{what} over blocks [{hop.start}, {hop.end}) failed: {error}") from error
        retry_after = error.retry_after if isinstance(error, ProtocolError) else None
        self.client.ban(hop.server.id, retry_after)
        self.client.backoff(attempt, retry_after)
        return attempt

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                start: int = 0, end: int | None = None, trace: Trace | None = None) -> torch.Tensor:
        """Hidden states after blocks [start, end); `trace` records each hop's inputs for backward."""
        end = self.num_blocks if end is None else end
        at, attempt = start, 0
        while at < end:
            try:
                chain = self.client.chain(at, end)
            except NoRoute as error:
                raise SwarmError(str(error)) from error
            for hop in chain:
                try:
                    output = self._forward_hop(hop, hidden, attention_mask, position_ids, prompts)
                except SERVER_FAILURES as error:
                    attempt = self._retry(error, hop, attempt, "forward")
                    break
                if trace is not None:
                    trace.hops.append(hop)
                    trace.inputs.append(hidden)
                hidden, at = output, hop.end
        return hidden

    def backward(self, trace: Trace, grad_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the first hop's inputs (and of the deep prompts), hop by hop in reverse."""
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        grad = grad_output
        for hop, hidden in zip(reversed(trace.hops), reversed(trace.inputs), strict=True):
            grad, grad_deep = self._backward_range(hop, hidden, grad, attention_mask, position_ids, prompts)
            if grad_prompts is not None and grad_deep is not None:
                grad_prompts[hop.start:hop.end] += grad_deep
        return grad, grad_prompts

    def _backward_range(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, prompts: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attempt = 0
        while True:
            try:
                return self._backward_hop(hop, hidden, grad, attention_mask, position_ids, prompts)
            except SERVER_FAILURES as error:
                attempt = self._retry(error, hop, attempt, "backward")
            # The server is gone: recompute this hop's blocks on other servers, then go back through them.
            inner = Trace()
            try:
                self.forward(hidden, attention_mask, position_ids, prompts, hop.start, hop.end, inner)
                grad_prompts = None if prompts is None else torch.zeros_like(prompts[hop.start:hop.end])
                for sub, sub_hidden in zip(reversed(inner.hops), reversed(inner.inputs), strict=True):
                    grad, deep = self._backward_hop(sub, sub_hidden, grad, attention_mask, position_ids, prompts)
                    if grad_prompts is not None and deep is not None:
                        grad_prompts[sub.start - hop.start:sub.end - hop.start] += deep
                return grad, grad_prompts
            except SERVER_FAILURES as error:
                attempt = self._retry(error, hop, attempt, "backward")
