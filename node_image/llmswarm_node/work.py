"""Work queued for the span: a session's step or a stateless forward, with the future its handler awaits.

The items carry what batch_policy.py reads to group them (rows, tokens, keys) and what
scheduler.py needs to run them; a result (or an error) is handed back to the event loop
that queued the item, from whichever thread ran it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmswarm_node.batching import HiddenRows, StepInput, batchable
from llmswarm_node.lora import ClientLora
from llmswarm_node.sessions import Session


@dataclass
class Work(HiddenRows):
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    enqueued: float = field(default_factory=time.monotonic)

    def resolve(self, result: Any) -> None:
        if running_loop() is self.loop:
            _settle(self.future, result)
        else:
            self.loop.call_soon_threadsafe(_settle, self.future, result)


FIRST_STEP = -1  # StepWork.key's token count for a session's first step


@dataclass
class StepWork(Work):
    session: Session | None = None
    prompts: torch.Tensor | None = None  # deep prompts of a session's first step: it runs alone
    done: int = 0  # new tokens already run (long steps run in chunks)
    pieces: list[torch.Tensor] = field(default_factory=list)
    piece_tokens: int = 1 << 30  # the most new tokens of one pass within the compute memory budget (memory.py)

    @property
    def past(self) -> int:
        """Tokens in the session's cache before the next piece of this step."""
        assert self.session is not None
        return self.session.position + self.done

    @property
    def batchable(self) -> bool:
        assert self.session is not None
        return self.prompts is None and batchable(self.session.cache)

    @property
    def key(self) -> tuple[int, int, int, str | None]:
        """(start, end, new tokens, adapter): steps with equal keys share a pass. A session's first step has
        FIRST_STEP for its new tokens: first steps of any length share one (batching._run_first_steps)."""
        assert self.session is not None
        first = self.session.position == 0 and self.done == 0
        return self.session.start, self.session.end, FIRST_STEP if first else self.hidden.shape[1], self.session.adapter

    def chunk(self, size: int) -> StepInput:
        """The next `size` new tokens of the step (all of them for a small step), as a pass input."""
        assert self.session is not None
        past = self.session.position + self.done
        stop = min(self.done + size, self.hidden.shape[1])
        mask = None if self.attention_mask is None else self.attention_mask[:, : past + stop - self.done]
        positions = None if self.position_ids is None else self.position_ids[:, self.done:stop]
        if positions is None and stop - self.done < self.hidden.shape[1]:
            positions = torch.arange(past, past + stop - self.done).unsqueeze(0).expand(self.hidden.shape[0], -1)
        return StepInput(self.session.cache, past, self.hidden[:, self.done:stop], mask, positions,
                         self.prompts if self.done == 0 else None, self.session.lora)


@dataclass
class ForwardWork(Work):
    """Stateless work: a forward, or a backward when `grad_output` is set (resolves to (grad_hidden, grad_prompts))."""

    start: int = 0
    end: int = 0
    prompts: torch.Tensor | None = None
    adapter: str | None = None
    grad_output: torch.Tensor | None = None
    rows_per_pass: int = 1 << 30  # a forward too big for one pass runs its rows in slices (memory.py)
    per_block: bool = False  # a backward too big to run whole runs block by block (span.py)
    lora: ClientLora | None = None  # the client's own LoRA weights: forwards with different ones still stack

    @property
    def kind(self) -> str:
        return "backward" if self.grad_output is not None else "forward"

    @property
    def key(self) -> tuple[Any, ...]:
        if self.grad_output is not None:
            return ("backward", id(self))  # backward passes run one request at a time
        prompts = None if self.prompts is None else (self.prompts.shape[0], *self.prompts.shape[2:])
        return (self.start, self.end, tuple(self.hidden.shape[1:]), self.attention_mask is None,
                self.position_ids is None, prompts, self.adapter)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
