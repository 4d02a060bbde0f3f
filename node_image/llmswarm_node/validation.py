"""Checking a request's tensors against the span, the server's limits and the session: pure, no I/O.

Every check raises ProtocolError (``bad_request`` for a malformed request, ``too_large`` for
one over a limit) with a message that says what was expected; what passes comes back as
:class:`Inputs`, integer masks and positions already as int64.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError
from llmswarm_node.sessions import ServerLimits, Session

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class SpanFacts(Protocol):
    """What requests are checked against: the blocks served, their width, the adapters loaded."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def adapters(self) -> Collection[str]: ...


@dataclass(frozen=True)
class Inputs:
    """A request's checked tensors."""

    hidden: torch.Tensor  # [batch, tokens, hidden]
    attention_mask: torch.Tensor | None  # [batch, past + tokens], int64 of 0 and 1
    position_ids: torch.Tensor | None  # [batch, tokens], int64
    prompts: torch.Tensor | None = None  # deep prompts [blocks, batch, prefix, hidden]
    grad_output: torch.Tensor | None = None  # a backward's output gradients, shaped like hidden

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


def check_blocks(span: SpanFacts, start: int, end: int) -> None:
    if not span.start <= start < end <= span.end:
        raise ProtocolError(
            "bad_request", f"blocks [{start}, {end}) are not inside this server's span [{span.start}, {span.end})"
        )


def check_adapter(span: SpanFacts, adapter: str | None) -> None:
    if adapter is not None and adapter not in span.adapters:
        raise ProtocolError("bad_request", f"unknown adapter {adapter!r}; this server has {sorted(span.adapters)}")


def check_open(span: SpanFacts, request: wire.OpenRequest) -> None:
    """An open's blocks and adapter (its length and batch are checked against the cache budget by sessions.py)."""
    check_blocks(span, request.start, request.end)
    check_adapter(span, request.adapter)


def stateless_inputs(span: SpanFacts, limits: ServerLimits, request: wire.ForwardRequest | wire.BackwardRequest,
                     tensors: dict[str, torch.Tensor]) -> Inputs:
    """A forward's or backward's blocks, adapter and tensors (a backward's also its ``grad_output``)."""
    check_blocks(span, request.start, request.end)
    check_adapter(span, request.adapter)
    backward = request.kind == "backward"
    extra = ("prompts", "grad_output") if backward else ("prompts",)
    hidden, mask, positions = hidden_states(span, limits, tensors, None, 0, limits.max_length, extra)
    prompts = deep_prompts(tensors.get("prompts"), request.end - request.start, hidden, hidden.shape[1])
    grad = grad_output(tensors.get("grad_output"), hidden) if backward else None
    return Inputs(hidden, mask, positions, prompts, grad)


def step_inputs(span: SpanFacts, limits: ServerLimits, session: Session, tensors: dict[str, torch.Tensor],
                prefill_chunk: int) -> Inputs:
    """A session step's tensors: its batch, the tokens left in the session, masks over past and new tokens."""
    hidden, mask, positions = hidden_states(
        span, limits, tensors, session.batch_size, session.position, session.max_length - session.position, ("prompts",)
    )
    return Inputs(hidden, mask, positions, session_prompts(tensors.get("prompts"), session, hidden, prefill_chunk))


def hidden_states(span: SpanFacts, limits: ServerLimits, tensors: dict[str, torch.Tensor], batch: int | None,
                  past: int, max_new: int, extra: tuple[str, ...] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check hidden [B, T, H], attention_mask [B, past + T], position_ids [B, T]."""
    unknown = set(tensors) - {"hidden", "attention_mask", "position_ids", *extra}
    if unknown:
        raise ProtocolError("bad_request", f"unknown tensors {sorted(unknown)}")
    hidden = tensors.get("hidden")
    if hidden is None:
        raise ProtocolError("bad_request", "missing tensor 'hidden'")
    if hidden.dtype not in FLOATS:
        raise ProtocolError("bad_request", f"'hidden' must be float32, float16 or bfloat16, not {hidden.dtype}")
    if hidden.ndim != 3 or hidden.shape[2] != span.hidden_size or hidden.shape[1] < 1:
        raise ProtocolError(
            "bad_request", f"'hidden' must have shape [batch, tokens>=1, {span.hidden_size}], got {list(hidden.shape)}"
        )
    b, t = hidden.shape[0], hidden.shape[1]
    if batch is not None and b != batch:
        raise ProtocolError("bad_request", f"'hidden' has batch {b}, the session was opened with {batch}")
    if b < 1 or b > limits.max_batch:
        raise ProtocolError("too_large", f"batch {b} is outside [1, {limits.max_batch}]")
    if b * t > limits.max_tokens_per_request:
        raise ProtocolError("too_large", f"{b * t} tokens in one request, limit {limits.max_tokens_per_request}")
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
        if bool((positions < 0).any()) or bool((positions >= limits.max_length).any()):
            raise ProtocolError("bad_request", f"'position_ids' must lie in [0, {limits.max_length})")
    return hidden, mask, positions


def deep_prompts(prompts: torch.Tensor | None, blocks: int, hidden: torch.Tensor, longest: int) -> torch.Tensor | None:
    """Deep prompts: [blocks, batch, prefix, hidden] with 0 < prefix <= `longest`."""
    if prompts is None:
        return None
    b, _, h = hidden.shape
    if prompts.dtype not in FLOATS or prompts.ndim != 4 or \
            list(prompts.shape[:2]) != [blocks, b] or prompts.shape[3] != h or not 0 < prompts.shape[2] <= longest:
        raise ProtocolError("bad_request", f"'prompts' must be a float tensor [{blocks}, {b}, prefix<={longest}, {h}], "
                                           f"got {prompts.dtype} {list(prompts.shape)}")
    return prompts


def session_prompts(prompts: torch.Tensor | None, session: Session, hidden: torch.Tensor,
                    prefill_chunk: int) -> torch.Tensor | None:
    """Deep prompts of a session's first step, prefix within the step and its first prefill chunk; they shape
    the cached keys and values of the first `prefix` positions for good."""
    if prompts is not None and session.position != 0:
        raise ProtocolError("bad_request", "deep prompts come with a session's first step only")
    longest = min(hidden.shape[1], prefill_chunk)
    return deep_prompts(prompts, session.end - session.start, hidden, longest)


def grad_output(grad: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    if grad is None or grad.shape != hidden.shape or not grad.is_floating_point():
        raise ProtocolError("bad_request", f"'grad_output' must be a float tensor shaped like 'hidden' {list(hidden.shape)}")
    return grad


def check_push_position(position: int, session: Session) -> None:
    """A push carries the session's position before its step: a stale or repeated push is refused."""
    if position != session.position:
        raise ProtocolError("bad_request", f"a push for position {position}, the session holds {session.position} tokens")

