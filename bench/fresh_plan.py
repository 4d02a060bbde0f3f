"""A fresh placement at scale for the placement benchmark: the capacity model and its upper bound.

Not part of the product (the substrates place with :func:`llmswarm_control.placement.place`);
it measures how close :func:`llmswarm_control.rebalance`'s greedy moves come to the best
possible bottleneck on 1,000 heterogeneous servers (``bench/placement.py``, ``tests/test_rebalance.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llmswarm_control.rebalance import search, search_state
from llmswarm_core.spans import Span


@dataclass(frozen=True)
class Capacity:
    """A server before it has a span: block-tokens/s it can compute, and how many blocks fit in its memory."""

    id: str
    capacity: float  # tokens/s x blocks: a span of L blocks serves capacity / L tokens/s
    max_blocks: int

    def __post_init__(self) -> None:
        if not (self.capacity > 0 and math.isfinite(self.capacity)):
            raise ValueError(f"server {self.id}: capacity must be a positive number")
        if self.max_blocks < 1:
            raise ValueError(f"server {self.id}: max_blocks must be >= 1")


def upper_bound(num_blocks: int, servers: Iterable[Capacity]) -> float:
    """No placement's bottleneck exceeds total capacity / blocks: the blocks' throughputs always add up to it."""
    return sum(s.capacity for s in servers) / num_blocks


def fresh_plan(num_blocks: int, servers: Sequence[Capacity], redundancy: int = 1, polish_seconds: float = 0.5) -> dict[str, Span]:
    """Spans for `servers` whose bottleneck throughput comes close to :func:`upper_bound`.

    Every server takes as many blocks as it can hold (the finest grain of throughput),
    largest throughput per block first, each into the window that reaches the most blocks
    still short of `redundancy`, then the least throughput; then greedy moves (as in
    :func:`plan`, with no minimum gain) polish the result for up to `polish_seconds`.
    """
    if num_blocks < 1 or redundancy < 1:
        raise ValueError("num_blocks and redundancy must be >= 1")
    lengths = [min(s.max_blocks, num_blocks) for s in servers]
    heights = [s.capacity / length for s, length in zip(servers, lengths, strict=True)]
    level = np.zeros(num_blocks)
    cov = np.zeros(num_blocks, dtype=np.int64)
    starts = [0] * len(servers)
    order = sorted(range(len(servers)), key=lambda i: (-heights[i], -lengths[i], i))
    for i in order:
        length = lengths[i]
        short = (cov < redundancy).astype(np.int64)
        window_short = np.convolve(short, np.ones(length, dtype=np.int64), mode="valid")
        window_level = np.convolve(level, np.ones(length), mode="valid")
        start = int(np.lexsort((np.arange(window_level.size), window_level, -window_short))[0])
        starts[i] = start
        level[start:start + length] += heights[i]
        cov[start:start + length] += 1
    spans = [Span(st, st + length) for st, length in zip(starts, lengths, strict=True)]
    state = search_state(num_blocks, spans, heights, level, redundancy, [True] * len(servers), [0.0] * len(servers))
    deadline = time.perf_counter() + polish_seconds
    while time.perf_counter() < deadline:
        state.moved.clear()
        steps, _, complete = search(state, max_moves=len(servers), max_steps=64, deadline=deadline)
        if complete or not steps:
            break
    return {s.id: Span(int(state.starts[i]), int(state.starts[i] + state.lengths[i])) for i, s in enumerate(servers)}


def capacity_bottleneck(num_blocks: int, servers: Sequence[Capacity], spans: Mapping[str, Span]) -> float:
    """Bottleneck throughput of a placement in the capacity model (a span of L blocks serves capacity / L)."""
    level = np.zeros(num_blocks)
    for s in servers:
        span = spans[s.id]
        level[span.start:span.end] += s.capacity / len(span)
    return float(level.min())
