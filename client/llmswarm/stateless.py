"""Stateless forward and backward through the swarm's blocks (no cache): for scoring and training.

Both retry like inference sessions: a failing server is avoided and its blocks routed again.
Forward keeps each hop's inputs (a Trace) so that backward can go back through the same hops;
when a hop's server is gone by then, its blocks are recomputed on other servers first (Petals'
``sequential_autograd``). Deep prompts and a client's own LoRA weights are tensors with a row
per block: each hop is sent its blocks' rows, and backward gathers their gradients the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from llmswarm.errors import SERVER_FAILURES, SwarmError
from llmswarm.routing import Hop, NoRoute
from llmswarm.sequence_manager import SwarmClient
from llmswarm_core import wire
from llmswarm_core.lora import LORA_TENSOR, LoraSpec
from llmswarm_core.wire import DTYPES, ProtocolError

ReplyT = TypeVar("ReplyT", wire.OutputReply, wire.GradientsReply)
Extras = dict[str, torch.Tensor]  # tensors with a row per block of the model ("prompts", "lora"), by wire name


@dataclass
class Trace:
    """What a stateless forward went through: each hop and the hidden states it received (for backward)."""

    hops: list[Hop] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)


class Gradients(NamedTuple):
    """A backward's result: of the first hop's inputs, of the deep prompts and of the LoRA weights (where sent)."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None = None
    lora: torch.Tensor | None = None


def _extras(prompts: torch.Tensor | None, lora: torch.Tensor | None) -> Extras:
    extras = {}
    if prompts is not None:
        extras["prompts"] = prompts
    if lora is not None:
        extras[LORA_TENSOR] = lora
    return extras


def _rows(extras: Extras, start: int, end: int) -> Extras:
    return {name: tensor[start:end] for name, tensor in extras.items()}


class RemoteSequential:
    """Stateless forward and backward through blocks (no cache): for scoring and training.

    `prompts` are deep prompts [num_blocks, batch, prefix, hidden]; `lora` the client's LoRA weights
    [num_blocks, per_block] laid out for `lora_spec` (llmswarm_core.lora); each hop gets its blocks' rows.
    """

    def __init__(self, client: SwarmClient, num_blocks: int, adapter: str | None = None,
                 lora_spec: LoraSpec | None = None) -> None:
        self.client = client
        self.num_blocks = num_blocks
        self.adapter = adapter
        self.lora_spec = lora_spec

    def _call(self, request: wire.ForwardRequest | wire.BackwardRequest, hop: Hop,
              tensors: dict[str, torch.Tensor | None], expected: type[ReplyT]) -> dict[str, torch.Tensor]:
        config = self.client.config
        wire_dtype = DTYPES[config.wire_dtype]
        payload = {}
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if name == LORA_TENSOR:  # weights travel in float32 whatever the wire dtype of hidden states
                payload[name] = tensor.to(torch.float32)
            else:
                payload[name] = tensor.to(wire_dtype) if tensor.is_floating_point() else tensor.to(torch.int64)
        response = self.client.http.post(
            f"{self.client.address(hop.server)}/v1/{request.kind}", data=wire.request_frame(request, payload),
            timeout=config.request_timeout,
            headers={"Content-Type": "application/octet-stream"}, verify=self.client.verify,
        )
        if response.status_code == 401:
            raise SwarmError(f"server {hop.server.id} refused the swarm token")
        frame = wire.decode(response.content, wire.WireLimits(max_tensor_bytes=config.max_message_bytes))
        wire.parse_reply(frame, expected)
        return frame.tensors

    def _fields(self, hop: Hop, sent: Extras) -> dict[str, Any]:
        """The header fields of a forward or backward over `hop` that sends `sent`."""
        lora = self.lora_spec if LORA_TENSOR in sent else None
        if LORA_TENSOR in sent and lora is None:
            raise ValueError("LoRA weights need the RemoteSequential's lora_spec")
        return {"start": hop.start, "end": hop.end, "wire_dtype": self.client.config.wire_dtype, "adapter": self.adapter,
                "lora": lora}

    def _forward_hop(self, hop: Hop, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, extras: Extras) -> torch.Tensor:
        sent = _rows(extras, hop.start, hop.end)
        request = wire.ForwardRequest(kind="forward", **self._fields(hop, sent))
        tensors = self._call(request, hop, {"hidden": hidden, "attention_mask": attention_mask,
                                            "position_ids": position_ids, **sent}, wire.OutputReply)
        output = tensors.get("hidden")
        if output is None or list(output.shape) != list(hidden.shape):
            raise ProtocolError("internal", f"server {hop.server.id} returned a malformed output")
        return output.to(hidden.dtype)

    def _backward_hop(self, hop: Hop, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None, extras: Extras) -> tuple[torch.Tensor, Extras]:
        sent = _rows(extras, hop.start, hop.end)
        request = wire.BackwardRequest(kind="backward", **self._fields(hop, sent))
        tensors = self._call(request, hop, {"hidden": hidden, "grad_output": grad_output, "attention_mask": attention_mask,
                                            "position_ids": position_ids, **sent}, wire.GradientsReply)
        grad_hidden = tensors.get("grad_hidden")
        grads = {name: tensors.get(f"grad_{name}") for name in sent}
        if grad_hidden is None or grad_hidden.shape != hidden.shape or any(
                grad is None or grad.shape != sent[name].shape for name, grad in grads.items()):
            raise ProtocolError("internal", f"server {hop.server.id} returned malformed gradients")
        return grad_hidden.to(hidden.dtype), {name: grad.to(sent[name].dtype) for name, grad in grads.items()
                                              if grad is not None}

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
                start: int = 0, end: int | None = None, trace: Trace | None = None,
                lora: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after blocks [start, end); `trace` records each hop's inputs for backward."""
        return self._forward(hidden, attention_mask, position_ids, _extras(prompts, lora), start, end, trace)

    def _forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 extras: Extras, start: int = 0, end: int | None = None, trace: Trace | None = None) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        at, attempt = start, 0
        while at < end:
            try:
                chain = self.client.chain(at, end)
            except NoRoute as error:
                raise SwarmError(str(error)) from error
            for hop in chain:
                try:
                    output = self._forward_hop(hop, hidden, attention_mask, position_ids, extras)
                except SERVER_FAILURES as error:
                    attempt = self._retry(error, hop, attempt, "forward")
                    break
                if trace is not None:
                    trace.hops.append(hop)
                    trace.inputs.append(hidden)
                hidden, at = output, hop.end
        return hidden

    def backward(self, trace: Trace, grad_output: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                 lora: torch.Tensor | None = None) -> Gradients:
        """Gradients of the first hop's inputs (and of the deep prompts and LoRA weights), hop by hop in reverse."""
        extras = _extras(prompts, lora)
        grad, totals = self._through(trace, grad_output, attention_mask, position_ids, extras, 0, self.num_blocks,
                                     self._backward_range)
        return Gradients(grad, totals.get("prompts"), totals.get(LORA_TENSOR))

    def _through(self, trace: Trace, grad: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, extras: Extras, first: int, last: int,
                 step: Callable[..., tuple[torch.Tensor, Extras]]) -> tuple[torch.Tensor, Extras]:
        """Back through a trace's hops in reverse with `step`; the per-block gradients of blocks [first, last)."""
        totals = {name: torch.zeros_like(tensor[first:last]) for name, tensor in extras.items()}
        for hop, hidden in zip(reversed(trace.hops), reversed(trace.inputs), strict=True):
            grad, per_block = step(hop, hidden, grad, attention_mask, position_ids, extras)
            for name, value in per_block.items():
                totals[name][hop.start - first:hop.end - first] += value
        return grad, totals

    def _backward_range(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, extras: Extras) -> tuple[torch.Tensor, Extras]:
        attempt = 0
        while True:
            try:
                return self._backward_hop(hop, hidden, grad, attention_mask, position_ids, extras)
            except SERVER_FAILURES as error:
                attempt = self._retry(error, hop, attempt, "backward")
            # The server is gone: recompute this hop's blocks on other servers, then go back through them.
            inner = Trace()
            try:
                self._forward(hidden, attention_mask, position_ids, extras, hop.start, hop.end, inner)
                return self._through(inner, grad, attention_mask, position_ids, extras, hop.start, hop.end,
                                     self._backward_hop)
            except SERVER_FAILURES as error:
                attempt = self._retry(error, hop, attempt, "backward")
