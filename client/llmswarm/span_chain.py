"""The server sessions of one inference session, in block order, and what each has seen.

Each span session keeps the inputs it was given (hidden states and positions of every step),
so that a replacement server can be given them again and rebuild the same attention cache;
the chain keeps each step's attention mask and the deep prompts of the first step for the same
replay. The step engine (step_engine.py) drives steps through the chain and replaces its spans.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llmswarm.errors import TRANSPORT_ERRORS, SwarmError
from llmswarm.lora import SessionLora
from llmswarm.routing import NoRoute
from llmswarm.sequence_manager import SwarmClient
from llmswarm.span_session import SpanSession
from llmswarm_core.wire import ProtocolError


@dataclass(frozen=True)
class Recorded:
    """One step's input to a span: the hidden states and the position ids it came with."""

    hidden: torch.Tensor
    position_ids: torch.Tensor | None


class SpanChain:
    """Span sessions covering blocks [0, num_blocks) for one inference session."""

    def __init__(self, client: SwarmClient, num_blocks: int, max_length: int, batch_size: int = 1,
                 adapter: str | None = None, lora: SessionLora | None = None) -> None:
        self.client = client
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.adapter = adapter
        self.lora = lora
        self.masks: list[torch.Tensor | None] = []  # the attention mask of each finished step
        self.prompts: torch.Tensor | None = None  # deep prompts [blocks, batch, prefix, hidden] of the first step
        self._spans = self.open_spans(0, num_blocks)
        self._inputs: dict[SpanSession, list[Recorded]] = {span: [] for span in self._spans}

    @property
    def spans(self) -> list[SpanSession]:
        return list(self._spans)

    @property
    def finished_steps(self) -> int:
        return len(self.masks)

    def span_at(self, block: int) -> SpanSession:
        """The span session whose blocks begin at `block`."""
        for span in self._spans:
            if span.start == block:
                return span
        raise KeyError(f"no span of the chain begins at block {block}")

    def spans_in(self, start: int, end: int) -> list[SpanSession]:
        """The span sessions inside blocks [start, end), in order."""
        return [span for span in self._spans if span.start >= start and span.end <= end]

    def can_push(self, spans: list[SpanSession]) -> bool:
        """Whether a step may be pushed through `spans` (the hops after the one it is sent to)."""
        return self.client.config.push and bool(spans) and all(span.push_key is not None for span in spans)

    def prompts_for(self, span: SpanSession, step: int) -> torch.Tensor | None:
        """The deep prompts of `span`'s blocks for the session's step number `step` (the first step only)."""
        return self.prompts[span.start:span.end] if self.prompts is not None and step == 0 else None

    def record(self, span: SpanSession, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        self._inputs[span].append(Recorded(hidden, position_ids))

    def inputs_of(self, span: SpanSession) -> list[Recorded]:
        """What `span` has been given, one entry per step of the session (a step's number is its index)."""
        return list(self._inputs[span])

    def finish_step(self, attention_mask: torch.Tensor | None) -> None:
        self.masks.append(attention_mask)

    def splice(self, old: list[SpanSession], new: list[SpanSession]) -> None:
        """Put `new` (which has seen nothing yet) in the place of the consecutive spans `old`."""
        at = self._spans.index(old[0])
        self._spans[at:at + len(old)] = new
        for span in old:
            self._inputs.pop(span, None)
        self._inputs.update({span: [] for span in new})

    def open_spans(self, start: int, end: int, exclude: Iterable[str] = ()) -> list[SpanSession]:
        """Open sessions over [start, end): a busy server is avoided for its Retry-After while others are
        tried at once; when every server that could serve is busy, wait for the first to free up
        (at most ``busy_timeout`` in all); a failing server is avoided and retried with backoff."""
        client, config = self.client, self.client.config
        failures, began = 0, time.monotonic()
        while True:
            opened: list[SpanSession] = []
            try:
                for hop in client.chain(start, end, exclude):
                    try:
                        opened.append(SpanSession(client, hop, self.max_length, self.batch_size, self.adapter, self.lora))
                    except ProtocolError as error:
                        if not error.retryable:
                            raise SwarmError(f"server {hop.server.id} refused blocks [{hop.start}, {hop.end}): {error}") from error
                        client.ban(hop.server.id, error.retry_after)
                        raise
                    except TRANSPORT_ERRORS:
                        client.ban(hop.server.id)
                        raise
                return opened
            except (*TRANSPORT_ERRORS, ProtocolError, NoRoute) as error:
                for span in opened:
                    span.close()
                busy = isinstance(error, ProtocolError) and error.retry_after is not None
                waiting = isinstance(error, NoRoute) and client.next_unban() is not None
                if busy or waiting:
                    if time.monotonic() - began > config.busy_timeout:
                        raise SwarmError(f"every server for blocks [{start}, {end}) stayed busy for "
                                         f"{config.busy_timeout:.0f} s: {error}") from error
                    if waiting:
                        time.sleep(min(config.backoff_max, max(0.05, client.next_unban() or 0.0)))
                    continue
                failures += 1
                if failures > config.max_retries:
                    raise SwarmError(f"cannot open a session over blocks [{start}, {end}): {error}") from error
                client.backoff(failures)

    def close(self) -> None:
        for span in self._spans:
            span.close()
