"""Run one function on the work of many threads at once.

A client process often serves many users (a gateway, a benchmark, a notebook with
threads). Two parts of each generated token are much cheaper done for all of them at
once than for each alone:

- the LM head, a matrix of vocabulary x hidden size that is read from memory in full for
  every call: for SmolLM2 that is 113 MB per token, 7 ms on one core;
- the trip through the servers: when every session's step reaches a server together, the
  server runs them in one pass (a pass for 16 sessions costs 3 times one for 1, not 16),
  and one thread driving all the steps hop by hop spares each thread its own wake-ups.

When several threads need the same function at the same moment, one of them (the leader)
runs it once for all; the others wait for their results. The leader waits at most
``max_wait`` for the threads that may still come (those not already in a running call);
a thread alone never waits. Calls may run at once: while a leader runs its group, the next
arrivals form the next group under a leader of their own, so groups of steps follow each
other through the servers like a pipeline.

A companion may stall (a slow streamer callback, user code between tokens): it still
counts, but does not come. After a wait that ran out unfilled, the next ``retry_after``
groups wait at most ``short_wait``; then one waits ``max_wait`` again, so threads that
drifted apart fall back in step. A stalled thread thus costs the others one long wait
per ``retry_after + 1`` groups instead of one per group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Item(Generic[T, R]):
    work: T
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """``run_many(works) -> results`` for works of the same ``key``, shared by the threads that call at once
    (without a key, any works may run together). A result may be an exception: that work's thread raises it."""

    def __init__(self, run_many: Callable[[list[T]], Sequence[R | BaseException]], key: Callable[[T], Hashable] | None = None,
                 max_wait: float = 0.002, short_wait: float = 0.002, retry_after: int = 16) -> None:
        self.run_many = run_many
        self.key = key
        self.max_wait = max_wait
        self.short_wait = min(short_wait, max_wait)
        self.retry_after = retry_after
        self._short_groups = 0  # groups still to wait only short_wait, after a wait that ran out unfilled
        self.long_waits_unfilled = 0  # max_wait waits that ran out before every companion came (diagnostics)
        self._cond = threading.Condition()
        self._pending: list[_Item[T, R]] = []
        self._leading = False
        self._running = 0  # works taken by a leader and not finished: their threads cannot join
        self.calls = 0  # run_many calls (for tests and diagnostics)
        self.works = 0

    def __call__(self, work: T, companions: int) -> R:
        """The result for `work`; `companions` is how many threads might join (including this one)."""
        if companions <= 1:
            result = self._run([work])[0]
            if isinstance(result, BaseException):  # a work's own error, as a leader hands it to each thread
                raise result
            return result
        item: _Item[T, R] = _Item(work)
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()
            lead = not self._leading
            if lead:
                self._leading = True
        if not lead:
            item.done.wait()
        else:
            self._lead(companions)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _lead(self, companions: int) -> None:
        with self._cond:
            short = self._short_groups > 0
            deadline = time.monotonic() + (self.short_wait if short else self.max_wait)
            while len(self._pending) + self._running < companions and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            if len(self._pending) + self._running >= companions:
                self._short_groups = 0
            elif short:
                self._short_groups -= 1
            else:
                self._short_groups = self.retry_after
                self.long_waits_unfilled += 1
            batch, self._pending = self._pending, []
            self._running += len(batch)
            self._leading = False  # the next arrival leads the next group
        try:
            groups: dict[Hashable, list[_Item[T, R]]] = {}
            for item in batch:
                groups.setdefault(None if self.key is None else self.key(item.work), []).append(item)
            for items in groups.values():
                try:
                    results = self._run([i.work for i in items])
                except BaseException as error:  # noqa: BLE001 - handed to each waiting thread
                    for i in items:
                        i.error = error
                        i.done.set()
                    continue
                for i, result in zip(items, results, strict=True):
                    if isinstance(result, BaseException):
                        i.error = result
                    else:
                        i.result = result
                    i.done.set()
        finally:
            with self._cond:
                self._running -= len(batch)
                self._cond.notify_all()

    def _run(self, works: list[T]) -> Sequence[R | BaseException]:
        self.calls += 1
        self.works += len(works)
        return self.run_many(works)


def stacked(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """run_many for a row-wise function: one call on the rows of every part stacked, split back."""

    def run_many(parts: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(parts) == 1:
            return [fn(parts[0])]
        output = fn(torch.cat(parts))
        return list(torch.split(output, [p.shape[0] for p in parts]))

    return run_many


def trailing_shape(rows: torch.Tensor) -> Hashable:
    return tuple(rows.shape[1:])
