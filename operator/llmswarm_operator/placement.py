"""Placement: which span of blocks each server holds. Pure, deterministic, no I/O.

Spans are half-open [start, end). Each server in turn takes the window of its size
whose block coverage, sorted ascending, is lexicographically smallest (it reinforces
the weakest blocks first, as Petals' block selection does); ties go to the leftmost
window. With equal span sizes and enough servers this tiles the model R times over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PlacementError(ValueError):
    """The servers cannot cover the model with the asked redundancy."""

    def __init__(self, message: str, uncovered: list[int]) -> None:
        super().__init__(message)
        self.uncovered = uncovered


@dataclass(frozen=True)
class Span:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid span [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def best_window(coverage: list[int], size: int) -> int:
    """Start of the window of `size` blocks whose sorted coverage is lexicographically smallest."""
    starts = range(len(coverage) - size + 1)
    return min(starts, key=lambda s: (sorted(coverage[s:s + size]), s))


def place_spans(
    num_blocks: int,
    servers: int | None = None,
    redundancy: int = 1,
    blocks_per_server: int | None = None,
) -> list[Span]:
    """Spans for equal servers so that every block is held by at least `redundancy` of them.

    Give `servers`, `blocks_per_server`, or both. With only `servers`, spans are as short
    as possible: ceil(redundancy * num_blocks / servers). With only `blocks_per_server`,
    the fewest servers that can reach the redundancy are used.
    """
    if num_blocks < 1 or redundancy < 1:
        raise ValueError("num_blocks and redundancy must be >= 1")
    if servers is None and blocks_per_server is None:
        raise ValueError("give servers, blocks_per_server or both")
    if blocks_per_server is None:
        assert servers is not None
        if servers < 1:
            raise ValueError("servers must be >= 1")
        blocks_per_server = min(num_blocks, math.ceil(redundancy * num_blocks / servers))
    if not 1 <= blocks_per_server <= num_blocks:
        raise ValueError(f"blocks_per_server must be in [1, {num_blocks}]")
    if servers is None:
        servers = redundancy * math.ceil(num_blocks / blocks_per_server)
    coverage = [0] * num_blocks
    spans = []
    for _ in range(servers):
        start = best_window(coverage, blocks_per_server)
        for block in range(start, start + blocks_per_server):
            coverage[block] += 1
        spans.append(Span(start, start + blocks_per_server))
    short = [b for b, c in enumerate(coverage) if c < redundancy]
    if short:
        raise PlacementError(
            f"{servers} servers of {blocks_per_server} blocks cannot hold {num_blocks} blocks {redundancy} times: "
            f"blocks {_ranges(short)} have fewer than {redundancy} servers "
            f"(need at least {redundancy * math.ceil(num_blocks / blocks_per_server)} servers)",
            short,
        )
    return spans


def _ranges(blocks: list[int]) -> str:
    parts, begin = [], blocks[0]
    for prev, cur in zip(blocks, [*blocks[1:], None], strict=True):
        if cur != prev + 1 if cur is not None else True:
            parts.append(f"[{begin}, {prev + 1})")
            begin = cur if cur is not None else begin
    return ", ".join(parts)
