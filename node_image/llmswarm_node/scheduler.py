"""The compute thread: runs the passes that batch_policy.py picks, and records their metrics.

One thread owns the span. Handlers queue work (work.py) and await its future; each round
the thread waits for companions as the policy allows, takes the policy's next pass out of
the queues and runs it: a decode group through batching.py, one chunk of a long step, or
stacked stateless forwards (or a lone backward) through the span. A lone decode step runs
inline on the event loop's thread instead, where the policy says no companion could join it.

Every pass stays within the compute memory budget (memory.py): work is checked when it is
queued, and refused (``too_large``) where not even its smallest piece fits; a step then runs
in pieces that fit, a forward in slices of rows, a backward block by block, and a decode group
takes only the companions that keep its stacked pass within the budget.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmswarm_core.wire import ProtocolError
from llmswarm_node import batch_policy, memory
from llmswarm_node.batch_policy import BatchOptions
from llmswarm_node.batching import run_steps
from llmswarm_node.lora import ClientLora, LoraRows, rows_of
from llmswarm_node.memory import PassShape
from llmswarm_node.metrics import ServerMetrics
from llmswarm_node.sessions import ServerLimits, Session
from llmswarm_node.span import SpanRunner
from llmswarm_node.work import ForwardWork, StepWork, Work, running_loop


class Scheduler:
    def __init__(self, span: SpanRunner, options: BatchOptions, metrics: ServerMetrics,
                 cycling_sessions: Callable[[float, float], int], memory_budget: int | None = None) -> None:
        self.span = span
        self.options = options
        self.budget = ServerLimits().compute_memory_bytes if memory_budget is None else memory_budget
        self.metrics = metrics
        self.cycling_sessions = cycling_sessions  # (now, horizon) -> sessions generating and due
        self._cond = threading.Condition()
        self._steps: list[StepWork] = []
        self._forwards: list[ForwardWork] = []
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
        work = StepWork(loop, loop.create_future(), hidden, attention_mask, position_ids, session=session, prompts=prompts,
                        piece_tokens=self._piece_tokens(session, hidden))
        with self._cond:
            idle = not (self._busy or self._steps or self._forwards or self._stopping)
            inline = batch_policy.runs_inline(
                work, idle, lambda: self.cycling_sessions(time.monotonic(), self.options.batch_wait))
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

    def forward(self, start: int, end: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, prompts: torch.Tensor | None = None, adapter: str | None = None,
                grad_output: torch.Tensor | None = None, lora: ClientLora | None = None) -> asyncio.Future[Any]:
        """A stateless forward, or with `grad_output` a backward (bulk work, after inference)."""
        rows, tokens, blocks = hidden.shape[0], hidden.shape[1], end - start
        shape = self.span.block_shape
        per_block, rows_per_pass = False, rows
        if grad_output is not None:
            plan = memory.backward_plan(shape, rows, tokens, blocks, self.budget)
            if plan is None:
                self._refuse("a backward", PassShape(rows, tokens, blocks, grad=True, per_block=True))
            per_block = plan == "per_block"
        else:
            rows_per_pass = memory.rows_per_pass(shape, rows, tokens, blocks, self.budget)
            if rows_per_pass == 0:
                self._refuse("a forward", PassShape(1, tokens, blocks))
        loop = asyncio.get_running_loop()
        work = ForwardWork(loop, loop.create_future(), hidden, attention_mask, position_ids, start=start, end=end,
                           prompts=prompts, adapter=adapter, grad_output=grad_output, lora=lora,
                           rows_per_pass=rows_per_pass, per_block=per_block)
        with self._cond:
            self._forwards.append(work)
            self._cond.notify()
        return work.future

    # ---- the compute memory budget (memory.py) -----------------------------------------------------------
    def _piece_tokens(self, session: Session, hidden: torch.Tensor) -> int:
        """The most new tokens of this step per pass within the budget; refused where not one fits."""
        rows, new, blocks = hidden.shape[0], hidden.shape[1], session.end - session.start
        piece = memory.largest_chunk(self.span.block_shape, rows, new, session.position, blocks,
                                     self.options.prefill_chunk, self.budget)
        if piece == 0:
            self._refuse("a step", PassShape(rows, 1, blocks, session.position + new - 1))
        return piece

    def _refuse(self, what: str, smallest: PassShape) -> None:
        need = memory.pass_bytes(self.span.block_shape, smallest)
        raise ProtocolError("too_large", f"{what} of {smallest.rows} row(s) x {smallest.new} token(s) through "
                                         f"{smallest.blocks} blocks needs about {need} bytes of compute memory even "
                                         f"in its smallest pass; this server's budget is {self.budget}")

    def _decode_fits(self, group: Sequence[StepWork]) -> bool:
        start, end, _, _ = group[0].key
        new = max(s.new_tokens for s in group)  # first steps of different lengths run padded to the longest
        shape = PassShape(sum(s.rows for s in group), new, end - start, max(s.past for s in group),
                          stacked_cache=len(group) > 1)
        return memory.fits(self.span.block_shape, shape, self.budget)

    def _forwards_fit(self, group: Sequence[ForwardWork]) -> bool:
        first = group[0]
        shape = PassShape(sum(w.rows for w in group), first.new_tokens, first.end - first.start)
        return memory.fits(self.span.block_shape, shape, self.budget)

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
                plan = batch_policy.next_pass(self._steps, self._forwards, self.options, self._decode_fits,
                                              self._forwards_fit)
                for step in plan.decode:
                    self._steps.remove(step)
                for work in plan.forwards:
                    self._forwards.remove(work)
                self._busy = True
            try:
                if plan.decode:
                    self._run_decode(plan.decode)
                if plan.chunk is not None:
                    self._run_chunk(plan.chunk)
                if plan.forwards:
                    self._run_forwards(plan.forwards)
            finally:
                with self._cond:
                    self._busy = False

    def _wait_for_companions(self) -> None:
        """Hold the oldest small step back while the policy says companions are due (the lock is held)."""
        deadline = batch_policy.companion_deadline(self._steps, self.options)
        if deadline is None:
            return
        while not self._stopping:
            due = self.cycling_sessions(time.monotonic(), max(0.0, deadline - time.monotonic()))
            if batch_policy.companions_here(self._steps, self.options, due):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _use_threads(self, tokens: int) -> None:
        wanted = batch_policy.threads_for(tokens, self.options, self._bulk_threads)
        if wanted != getattr(self._threads_now, "value", -1):
            torch.set_num_threads(wanted)
            self._threads_now.value = wanted

    def _observe(self, kind: str, works: Sequence[Work], rows: int, tokens: int, started: float | None = None) -> None:
        now = started or time.monotonic()
        self.metrics.batch_size.labels(kind).observe(rows)
        self.metrics.pass_tokens.labels(kind).observe(tokens)
        for work in works:
            self.metrics.queue_wait.labels(kind).observe(now - work.enqueued)

    def _run_decode(self, group: list[StepWork]) -> None:
        started = time.monotonic()
        inputs = [step.chunk(self.options.prefill_chunk) for step in group]
        rows = sum(i.rows for i in inputs)
        tokens = sum(i.rows * i.new_tokens for i in inputs)
        self._use_threads(tokens)
        start, end, _, adapter = group[0].key
        began = time.perf_counter()
        try:
            if len(group) == 1 and group[0].piece_tokens < group[0].new_tokens:
                outputs = [self._run_pieces(group[0])]  # a step whose pass would not fit the budget whole
            else:
                outputs = run_steps(self.span, start, end, inputs, adapter)
        except BaseException as error:  # noqa: BLE001 - handed to every waiting handler
            for step in group:
                step.resolve(error)
            return
        elapsed = time.perf_counter() - began
        for step, output in zip(group, outputs, strict=True):
            step.resolve(output)
        # Metrics after the outputs are handed over (inline: after the replies are sent), off the critical path.
        loop = running_loop()
        if loop is None:
            self._record_pass(group, rows, tokens, started, elapsed)
        else:
            loop.call_soon(self._record_pass, group, rows, tokens, started, elapsed)

    def _record_pass(self, group: list[StepWork], rows: int, tokens: int, started: float, elapsed: float) -> None:
        self._observe("inference", group, rows, tokens, started)
        self.metrics.pass_seconds.labels("inference").observe(elapsed)

    def _run_pieces(self, step: StepWork) -> torch.Tensor:
        """All of a step, in passes of at most its piece_tokens new tokens."""
        start, end, _, adapter = step.key
        while step.done < step.new_tokens:
            piece = step.chunk(step.piece_tokens)
            step.pieces.append(run_steps(self.span, start, end, [piece], adapter)[0])
            step.done += piece.new_tokens
        return torch.cat(step.pieces, dim=1)

    def _run_chunk(self, step: StepWork) -> None:
        piece = step.chunk(min(self.options.prefill_chunk, step.piece_tokens))
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

    def _run_forwards(self, group: list[ForwardWork]) -> None:
        rows = sum(w.rows for w in group)
        tokens = sum(w.rows * w.new_tokens for w in group)
        first = group[0]
        kind = first.kind
        self._observe(kind, group, rows, tokens)
        self._use_threads(tokens)
        began = time.perf_counter()
        if first.grad_output is not None:
            try:
                grads = self.span.backward(first.hidden, first.grad_output, first.attention_mask, first.position_ids,
                                           first.start, first.end, first.prompts, first.adapter, first.per_block,
                                           lora=first.lora)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting handler
                first.resolve(error)
                return
            self.metrics.pass_seconds.labels(kind).observe(time.perf_counter() - began)
            first.resolve(grads)
            return
        try:
            hidden = torch.cat([w.hidden.to(self.span.dtype) for w in group])
            mask = None if first.attention_mask is None else torch.cat([w.attention_mask for w in group])  # type: ignore[misc]
            positions = None if first.position_ids is None else torch.cat([w.position_ids for w in group])  # type: ignore[misc]
            prompts = None if first.prompts is None else torch.cat([w.prompts for w in group], dim=1)  # type: ignore[misc]
            if len(group) > 1 or first.rows_per_pass >= rows:  # a stacked group fits whole (_forwards_fit)
                output = self.span.forward(hidden, mask, positions, None, first.start, first.end, prompts, first.adapter,
                                           lora=rows_of(group))
            else:  # one forward too big for one pass: its rows in slices that fit
                step = first.rows_per_pass
                output = torch.cat([
                    self.span.forward(hidden[row:row + step], None if mask is None else mask[row:row + step],
                                      None if positions is None else positions[row:row + step], None, first.start,
                                      first.end, None if prompts is None else prompts[:, row:row + step],
                                      first.adapter, lora=LoraRows.uniform(first.lora, min(step, rows - row)))
                    for row in range(0, rows, step)
                ])
        except BaseException as error:  # noqa: BLE001 - handed to every waiting handler
            for work in group:
                work.resolve(error)
            return
        self.metrics.pass_seconds.labels(kind).observe(time.perf_counter() - began)
        row = 0
        for work in group:
            work.resolve(output[row:row + work.rows])
            row += work.rows

    def _fail_all(self, error: BaseException) -> None:
        for work in [*self._steps, *self._forwards]:
            work.resolve(error)
        self._steps.clear()
        self._forwards.clear()
