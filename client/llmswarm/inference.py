"""Inference sessions: a chain of server sessions covering every block, stepped a chunk of tokens at a time.

Steps run through the step engine (step_engine.py), one session's alone (``InferenceSession.step``)
or many sessions' together (``step_together``, which the model's coalescer calls with the steps of
threads that generate at once), with failover and replay when a server fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmswarm.errors import SwarmError
from llmswarm.lora import SessionLora
from llmswarm.sequence_manager import SwarmClient
from llmswarm.span_chain import SpanChain
from llmswarm.span_session import SpanSession
from llmswarm.step_engine import Step, run_steps


@dataclass
class SessionStep:
    """One session's step, for step_together(): the new tokens' hidden states [batch, new, hidden], the attention
    mask of past and new tokens, the new tokens' position ids, and deep prompts (with the first step only)."""

    session: InferenceSession
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompts: torch.Tensor | None = None

    @property
    def new_tokens(self) -> int:
        return int(self.hidden.shape[1])


class InferenceSession:
    """A chain of server sessions covering every block, stepped one chunk of tokens at a time.

    ``step`` takes hidden states of the new tokens [batch, new, hidden], the attention
    mask of past and new tokens [batch, past + new] and the new tokens' position ids,
    and returns the hidden states after the last block.
    """

    def __init__(self, client: SwarmClient, num_blocks: int, max_length: int, batch_size: int = 1,
                 adapter: str | None = None, lora: SessionLora | None = None) -> None:
        self.client = client
        self.adapter = adapter
        self.lora = lora  # the client's own LoRA weights: each server gets its blocks' with the session's open
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.position = 0
        self._closed = False
        self._chain = SpanChain(client, num_blocks, max_length, batch_size, adapter, lora)

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        """(server id, start, end) of each hop currently used."""
        return [(s.server_id, s.start, s.end) for s in self._chain.spans]

    @property
    def spans(self) -> list[SpanSession]:
        """The server sessions of each hop currently used."""
        return self._chain.spans

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """`prompts`: deep prompts [every block, batch, prefix, hidden] (deep prompt tuning), with the first step
        only: each block adds its prompt to the first `prefix` positions, whose cached keys and values keep them."""
        result = step_together([SessionStep(self, hidden, attention_mask, position_ids, prompts)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def begin_step(self, step: SessionStep) -> Step:
        """Check `step` (raises SwarmError) and make it the engine's; see end_step."""
        if self._closed:
            raise SwarmError("the inference session is closed")
        if self.position + step.new_tokens > self.max_length:
            raise SwarmError(f"{self.position + step.new_tokens} tokens exceed the session's max_length {self.max_length}")
        if step.prompts is not None:
            if self.position != 0:
                raise SwarmError("deep prompts come with a session's first step only")
            if step.prompts.shape[0] != self.num_blocks:
                raise SwarmError(f"deep prompts are for {step.prompts.shape[0]} blocks, the model has {self.num_blocks}")
            self._chain.prompts = step.prompts.detach().cpu()
        return Step(self._chain, self._chain.finished_steps, step.hidden, step.attention_mask, step.position_ids)

    def end_step(self, step: SessionStep) -> None:
        """`step` went through every block: the servers' caches hold its tokens."""
        self._chain.finish_step(step.attention_mask)
        self.position += step.new_tokens

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._chain.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def step_together(steps: list[SessionStep]) -> list[torch.Tensor | Exception]:
    """Steps of many sessions, driven hop by hop together from this thread.

    At each hop every session's step is sent before any output is awaited, so steps that
    go to the same server arrive together and share one pass there (with push, the servers
    hand them on together; this thread sends only the first hop and reads the outputs). A
    session whose server fails leaves the group and finishes its step alone (failover and
    replay). Returns each step's output, or the error it ended with.
    """
    results: dict[int, torch.Tensor | Exception] = {}
    admitted: list[int] = []
    work: list[Step] = []
    for i, step in enumerate(steps):
        try:
            work.append(step.session.begin_step(step))
        except SwarmError as error:
            results[i] = error
            continue
        admitted.append(i)
    for i, output in zip(admitted, run_steps(work), strict=True):
        if not isinstance(output, Exception):
            steps[i].session.end_step(steps[i])
        results[i] = output
    return [results[i] for i in range(len(steps))]
