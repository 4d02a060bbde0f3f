"""Run one function on the rows of many threads at once.

A client process often serves many users (a gateway, a benchmark, a notebook with
threads). Each generated token ends with the LM head, a matrix of vocabulary x hidden
size that is read from memory in full for every call: for SmolLM2 that is 113 MB per
token, 7 ms on one core. When several threads need it at the same moment, one of them
(the leader) stacks their rows and runs it once for all; the others wait for their rows.
A thread alone, or one that finds no company within ``max_wait``, runs it by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _Item:
    rows: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Coalescer:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_wait: float = 0.002) -> None:
        self.fn = fn
        self.max_wait = max_wait
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._leading = False
        self.calls = 0  # passes run (for tests and diagnostics)
        self.rows = 0

    def __call__(self, rows: torch.Tensor, companions: int) -> torch.Tensor:
        """Run fn on `rows` ([batch, ...]); `companions` is how many threads might join (including this one)."""
        if companions <= 1:
            return self._run([rows])[0]
        item = _Item(rows)
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
        assert item.result is not None
        return item.result

    def _lead(self, companions: int) -> None:
        deadline = time.monotonic() + self.max_wait
        while True:
            with self._cond:
                while len(self._pending) < companions and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                batch, self._pending = self._pending, []
                if not batch:
                    self._leading = False
                    return
            groups: dict[tuple[int, ...], list[_Item]] = {}
            for item in batch:
                groups.setdefault(tuple(item.rows.shape[1:]), []).append(item)
            for items in groups.values():
                try:
                    results = self._run([i.rows for i in items])
                except BaseException as error:  # noqa: BLE001 - handed to each waiting thread
                    for i in items:
                        i.error = error
                        i.done.set()
                    continue
                for i, result in zip(items, results, strict=True):
                    i.result = result
                    i.done.set()
            deadline = time.monotonic()  # later arrivals: run at once, without waiting again

    def _run(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        self.rows += sum(p.shape[0] for p in parts)
        if len(parts) == 1:
            return [self.fn(parts[0])]
        output = self.fn(torch.cat(parts))
        return list(torch.split(output, [p.shape[0] for p in parts]))
