"""One compute thread fed by a priority queue: inference steps before bulk work.

The event loop decodes and validates requests; the compute itself (torch, which
releases the GIL) runs here, one task at a time, so the span's weights are read by
one pass at a time and interactive sessions are not stuck behind training batches.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1


class TaskPool:
    def __init__(self, name: str = "compute") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, priority: int, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn`; the returned future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((priority, next(self._order), (loop, future, fn)))
        return future

    def _run(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            loop, future, fn = item
            if future.cancelled():
                continue
            try:
                result = fn()
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting handler
                loop.call_soon_threadsafe(_set_exception, future, error)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=5)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
