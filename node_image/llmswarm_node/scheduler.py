"""The compute thread: batches inference steps across sessions, inference before bulk work.

Each round, on one thread that owns the span:

1. Decode: the oldest pending small step (at most ``prefill_chunk`` new tokens) and every
   pending step with the same blocks and token count go through the span in one pass
   (batching.py), up to ``max_batch_rows`` rows and ``max_batch_tokens`` tokens. A step
   waits at most ``batch_wait`` seconds for companions, and only for sessions that are in
   the middle of a generation and due (their steps keep coming at a measured pace): a lone
   client, or one beside idle sessions, never waits. Sessions that generate together thus
   fall into step and share every pass, instead of splitting into small staggered groups.
2. Prefill: one chunk of ``prefill_chunk`` tokens of the oldest long step, so a long prompt
   advances every round without stalling the decode steps of others.
3. Bulk: only when no inference work is pending, stateless forwards of the same shape and
   blocks are stacked along the batch and run together.

A lone decode step (nothing pending, nothing running, no other session due) runs at once
on the event loop's thread instead: no companion could join it, and the two thread
hand-offs it saves (to the compute thread and back) are a measurable part of a hop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmswarm_node.batching import StepInput, batchable, run_steps
from llmswarm_node.metrics import ServerMetrics
from llmswarm_node.sessions import Session
from llmswarm_node.span import SpanModel

DECODE_TOKENS = 4  # a pass this small is bound by reading weights: more threads only add wake-up latency


@dataclass(frozen=True)
class BatchOptions:
    max_batch_rows: int = 32  # rows (sessions x their batch) in one decode pass
    max_batch_tokens: int = 4096  # tokens in one pass
    batch_wait: float = 0.008  # seconds a step may wait for companions that are due
    prefill_chunk: int = 256  # tokens of a long step per round
    threads: int = 0  # torch threads for prefill and bulk work (0: torch's default)
    decode_threads: int = 1  # torch threads for passes of at most DECODE_TOKENS tokens (0: same as threads)


@dataclass
class _Work:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[torch.Tensor]
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    enqueued: float = field(default_factory=time.monotonic)

    def resolve(self, result: Any) -> None:
        if _running_loop() is self.loop:
            _settle(self.future, result)
        else:
            self.loop.call_soon_threadsafe(_settle, self.future, result)


@dataclass
class _Step(_Work):
    session: Session | None = None
    prompts: torch.Tensor | None = None  # deep prompts of a session's first step: it runs alone
    done: int = 0  # new tokens already run (long steps run in chunks)
    pieces: list[torch.Tensor] = field(default_factory=list)

    @property
    def batchable(self) -> bool:
        assert self.session is not None
        return self.prompts is None and batchable(self.session.cache)

    @property
    def key(self) -> tuple[int, int, int, str | None]:
        assert self.session is not None
        return self.session.start, self.session.end, self.hidden.shape[1], self.session.adapter

    def chunk(self, size: int) -> StepInput:
        assert self.session is not None
        past = self.session.position + self.done
        stop = min(self.done + size, self.hidden.shape[1])
        mask = None if self.attention_mask is None else self.attention_mask[:, : past + stop - self.done]
        positions = None if self.position_ids is None else self.position_ids[:, self.done:stop]
        if positions is None and stop - self.done < self.hidden.shape[1]:
            positions = torch.arange(past, past + stop - self.done).unsqueeze(0).expand(self.hidden.shape[0], -1)
        return StepInput(self.session.cache, past, self.hidden[:, self.done:stop], mask, positions,
                         self.prompts if self.done == 0 else None)


@dataclass
class _Forward(_Work):
    """Stateless work: a forward, or a backward when `grad_output` is set (resolves to (grad_hidden, grad_prompts))."""

    start: int = 0
    end: int = 0
    prompts: torch.Tensor | None = None
    adapter: str | None = None
    grad_output: torch.Tensor | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        if self.grad_output is not None:
            return ("backward", id(self))  # backward passes run one request at a time
        prompts = None if self.prompts is None else (self.prompts.shape[0], *self.prompts.shape[2:])
        return (self.start, self.end, tuple(self.hidden.shape[1:]), self.attention_mask is None,
                self.position_ids is None, prompts, self.adapter)


class Scheduler:
    def __init__(self, span: SpanModel, options: BatchOptions, metrics: ServerMetrics,
                 cycling_sessions: Callable[[float, float], int]) -> None:
        self.span = span
        self.options = options
        self.metrics = metrics
        self.cycling_sessions = cycling_sessions  # (now, horizon) -> sessions generating and due
        self._cond = threading.Condition()
        self._steps: list[_Step] = []
        self._forwards: list[_Forward] = []
        self._stopping = False
        self._busy = False  # a pass is running (on the compute thread or inline on the loop's thread)
        self._bulk_threads = options.threads or torch.get_num_threads()
        self._threads_now = threading.local()  # OpenMP thread counts are per thread
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._steps) + len(self._forwards)

    def step(self, session: Session, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, prompts: torch.Tensor | None = None) -> asyncio.Future[torch.Tensor]:
        loop = asyncio.get_running_loop()
        work = _Step(loop, loop.create_future(), hidden, attention_mask, position_ids, session=session, prompts=prompts)
        with self._cond:
            inline = self._alone(work)
            if inline:
                self._busy = True
            else:
                self._steps.append(work)
                self._cond.notify()
        if inline:
            try:
                self._run_decode([work])
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify()
        return work.future

    def _alone(self, work: _Step) -> bool:
        """May this step run inline: a tiny pass that no other work could join or has to wait for?"""
        if self._busy or self._steps or self._forwards or self._stopping:
            return False
        if work.hidden.shape[0] * work.hidden.shape[1] > DECODE_TOKENS:
            return False
        return self.cycling_sessions(time.monotonic(), self.options.batch_wait) <= 1

    def forward(self, start: int, end: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, prompts: torch.Tensor | None = None, adapter: str | None = None,
                grad_output: torch.Tensor | None = None) -> asyncio.Future[Any]:
        """A stateless forward, or with `grad_output` a backward (bulk work, after inference)."""
        loop = asyncio.get_running_loop()
        work = _Forward(loop, loop.create_future(), hidden, attention_mask, position_ids, start=start, end=end,
                        prompts=prompts, adapter=adapter, grad_output=grad_output)
        with self._cond:
            self._forwards.append(work)
            self._cond.notify()
        return work.future

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the compute thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (((self._steps or self._forwards) and not self._busy) or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                self._wait_for_companions()
                group = self._take_decode_group()
                long_step = next((s for s in self._steps if s.hidden.shape[1] > self.options.prefill_chunk), None)
                forwards = self._take_forward_group() if not group and long_step is None else []
                self._busy = True
            try:
                if group:
                    self._run_decode(group)
                if long_step is not None:
                    self._run_chunk(long_step)
                if forwards:
                    self._run_forwards(forwards)
            finally:
                with self._cond:
                    self._busy = False

    def _small(self) -> list[_Step]:
        return [s for s in self._steps if s.hidden.shape[1] <= self.options.prefill_chunk]

    def _wait_for_companions(self) -> None:
        small = self._small()
        if not small:
            return
        deadline = small[0].enqueued + self.options.batch_wait
        while not self._stopping:
            small = self._small()
            due = self.cycling_sessions(time.monotonic(), max(0.0, deadline - time.monotonic()))
            if len(small) >= due or sum(s.hidden.shape[0] for s in small) >= self.options.max_batch_rows:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take_decode_group(self) -> list[_Step]:
        small = self._small()
        if not small:
            return []
        key = small[0].key
        group, rows, tokens = [], 0, 0
        for step in small:
            if step.key != key:
                continue
            b, t = step.hidden.shape[:2]
            if group and (rows + b > self.options.max_batch_rows or tokens + b * t > self.options.max_batch_tokens
                          or not step.batchable):
                continue
            group.append(step)
            rows, tokens = rows + b, tokens + b * t
            if not step.batchable:
                break
        for step in group:
            self._steps.remove(step)
        return group

    def _take_forward_group(self) -> list[_Forward]:
        if not self._forwards:
            return []
        key = self._forwards[0].key
        group, tokens = [], 0
        for work in self._forwards:
            size = work.hidden.shape[0] * work.hidden.shape[1]
            if work.key == key and (not group or tokens + size <= self.options.max_batch_tokens):
                group.append(work)
                tokens += size
        for work in group:
            self._forwards.remove(work)
        return group

    def _use_threads(self, tokens: int) -> None:
        decode = self.options.decode_threads
        wanted = decode if decode and tokens <= DECODE_TOKENS else self._bulk_threads
        if wanted != getattr(self._threads_now, "value", -1):
            torch.set_num_threads(wanted)
            self._threads_now.value = wanted

    def _observe(self, kind: str, works: list[Any], rows: int, tokens: int, started: float | None = None) -> None:
        now = started or time.monotonic()
        self.metrics.batch_size.labels(kind).observe(rows)
        self.metrics.pass_tokens.labels(kind).observe(tokens)
        for work in works:
            self.metrics.queue_wait.labels(kind).observe(now - work.enqueued)

    def _run_decode(self, group: list[_Step]) -> None:
        started = time.monotonic()
        inputs = [step.chunk(self.options.prefill_chunk) for step in group]
        rows = sum(i.rows for i in inputs)
        tokens = sum(i.rows * i.new_tokens for i in inputs)
        self._use_threads(tokens)
        start, end, _, adapter = group[0].key
        began = time.perf_counter()
        try:
            outputs = run_steps(self.span, start, end, inputs, adapter)
        except BaseException as error:  # noqa: BLE001 - handed to every waiting handler
            for step in group:
                step.resolve(error)
            return
        elapsed = time.perf_counter() - began
        for step, output in zip(group, outputs, strict=True):
            step.resolve(output)
        # Metrics after the outputs are handed over (inline: after the replies are sent), off the critical path.
        loop = _running_loop()
        if loop is None:
            self._record_pass(group, rows, tokens, started, elapsed)
        else:
            loop.call_soon(self._record_pass, group, rows, tokens, started, elapsed)

    def _record_pass(self, group: list[_Step], rows: int, tokens: int, started: float, elapsed: float) -> None:
        self._observe("inference", group, rows, tokens, started)
        self.metrics.pass_seconds.labels("inference").observe(elapsed)

    def _run_chunk(self, step: _Step) -> None:
        piece = step.chunk(self.options.prefill_chunk)
        if step.done == 0:
            self.metrics.queue_wait.labels("inference").observe(time.monotonic() - step.enqueued)
        self.metrics.batch_size.labels("inference").observe(piece.rows)
        self.metrics.pass_tokens.labels("inference").observe(piece.rows * piece.new_tokens)
        self._use_threads(piece.rows * piece.new_tokens)
        start, end, _, adapter = step.key
        began = time.perf_counter()
        try:
            step.pieces.append(run_steps(self.span, start, end, [piece], adapter)[0])
        except BaseException as error:  # noqa: BLE001 - handed to the waiting handler
            with self._cond:
                self._steps.remove(step)
            step.resolve(error)
            return
        self.metrics.pass_seconds.labels("inference").observe(time.perf_counter() - began)
        step.done += piece.new_tokens
        if step.done >= step.hidden.shape[1]:
            with self._cond:
                self._steps.remove(step)
            step.resolve(torch.cat(step.pieces, dim=1))

    def _run_forwards(self, group: list[_Forward]) -> None:
        rows = sum(w.hidden.shape[0] for w in group)
        tokens = sum(w.hidden.shape[0] * w.hidden.shape[1] for w in group)
        first = group[0]
        kind = "backward" if first.grad_output is not None else "forward"
        self._observe(kind, group, rows, tokens)
        self._use_threads(tokens)
        began = time.perf_counter()
        if first.grad_output is not None:
            try:
                grads = self.span.backward(first.hidden, first.grad_output, first.attention_mask, first.position_ids,
                                           first.start, first.end, first.prompts, first.adapter)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting handler
                first.resolve(error)
                return
            self.metrics.pass_seconds.labels(kind).observe(time.perf_counter() - began)
            first.resolve(grads)  # type: ignore[arg-type]
            return
        try:
            hidden = torch.cat([w.hidden.to(self.span.dtype) for w in group])
            mask = None if first.attention_mask is None else torch.cat([w.attention_mask for w in group])  # type: ignore[misc]
            positions = None if first.position_ids is None else torch.cat([w.position_ids for w in group])  # type: ignore[misc]
            prompts = None if first.prompts is None else torch.cat([w.prompts for w in group], dim=1)  # type: ignore[misc]
            output = self.span.forward(hidden, mask, positions, None, first.start, first.end, prompts, first.adapter)
        except BaseException as error:  # noqa: BLE001 - handed to every waiting handler
            for work in group:
                work.resolve(error)
            return
        self.metrics.pass_seconds.labels(kind).observe(time.perf_counter() - began)
        row = 0
        for work in group:
            work.resolve(output[row:row + work.hidden.shape[0]])
            row += work.hidden.shape[0]

    def _fail_all(self, error: BaseException) -> None:
        for work in [*self._steps, *self._forwards]:
            work.resolve(error)
        self._steps.clear()
        self._forwards.clear()


def _running_loop() -> asyncio.AbstractEventLoop | None:
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
