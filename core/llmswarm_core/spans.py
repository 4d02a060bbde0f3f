"""Spans of blocks and how many servers cover each block: the one place that counts coverage.

Spans are half-open ``[start, end)`` everywhere. The placement, the rebalancer, the
operator's planner and the route map all count servers (or their throughput) per block
through :func:`coverage`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload


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


@overload
def coverage(num_blocks: int, spans: Iterable[Span | tuple[int, int]]) -> list[int]: ...
@overload
def coverage(num_blocks: int, spans: Iterable[Span | tuple[int, int]], weights: Iterable[float]) -> list[float]: ...
def coverage(num_blocks: int, spans: Iterable[Span | tuple[int, int]], weights: Iterable[float] | None = None) -> list[int] | list[float]:
    """How many of `spans` hold each block of ``[0, num_blocks)``; with `weights`, the sum of their weights.

    Parts of a span past the last block are ignored.
    """
    counts: list[float] = [0] * num_blocks
    weight_of = iter(weights) if weights is not None else None
    for span in spans:
        start, end = (span.start, span.end) if isinstance(span, Span) else span
        weight = next(weight_of) if weight_of is not None else 1
        for block in range(start, min(end, num_blocks)):
            counts[block] += weight
    return counts  # type: ignore[return-value]


def ranges(blocks: Sequence[int]) -> str:
    """Block indices as half-open ranges, e.g. ``[0, 1, 2, 5] -> "[0, 3), [5, 6)"``; empty string for none."""
    if not blocks:
        return ""
    ordered = sorted(blocks)
    parts, begin = [], ordered[0]
    for prev, cur in zip(ordered, [*ordered[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            parts.append(f"[{begin}, {prev + 1})")
            if cur is not None:
                begin = cur
    return ", ".join(parts)
