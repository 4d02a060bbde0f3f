"""Rebalancing: move spans where the load is. Pure, deterministic, no I/O (docs/rebalancing.md).

Plain data in, plain data out. The caller measures each online server (its span, its
measured throughput, how busy it is) and gets back a :class:`Plan`: the moves to make,
the assignment after them, and the bottleneck before and after.

The model
---------
- A server ``i`` with span ``[start, end)`` serves ``t_i`` tokens/s through its span
  (``llmswarm_throughput_tokens_per_second``, measured at start); every block of its
  span gets ``t_i`` tokens/s of capacity from it. A move keeps the span's length, so it
  keeps ``t_i``.
- Its utilisation ``u_i`` in [0, 1] is the share of that capacity in use. The load it
  carries, ``t_i * u_i`` tokens/s, is demand that clients send through each block of its
  span: ``demand[b]`` is the sum of it over the servers holding block ``b``. Demand
  belongs to the blocks, not to the servers, so it stays where it is when servers move.
- The **spare throughput** of block ``b`` is its capacity minus its demand:
  ``sum(t_i for i holding b) - demand[b]`` (for the current spans this is
  ``sum(t_i * (1 - u_i))``). The **objective** is the swarm's bottleneck: the smallest
  spare throughput over all blocks. With no load it is Petals' bottleneck throughput.

The planner
-----------
Greedy, one server at a time: among every movable server and every window of its span's
length, take the move that leaves the fewest blocks at (or below) the current bottleneck
level without lowering it, and among those the one with the highest new bottleneck (ties:
the least busy server, then the first). A move may not take any block below
``min(redundancy, replicas it has now)`` servers. It stops at ``max_moves`` distinct
servers, when a server would move a second time, or when no move helps. The plan is cut
to the shortest prefix that reaches its best bottleneck, and dropped entirely unless that
raises the bottleneck by more than ``min_gain`` (relative), so small gains never cause
churn. A complete plan (the search was not cut short) reaches a fixed point: planning again
with the same demand moves nothing.

Moves are listed in the order they must run; each keeps every block at its redundancy,
so running them one at a time, make-before-break, never uncovers a block.

:func:`fresh_plan` places servers from scratch for a bottleneck close to the upper bound
``sum(capacity) / num_blocks``: spans as long as memory allows, greedy filling of the
lowest windows, then the same moves as a polish (``bench/placement.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmswarm_core.spans import Span, coverage

#: Relative tolerance (of the mean block capacity) under which two levels are the same.
_TOL = 1e-9
#: When the bottleneck has no spare throughput at all, gains are measured against this share of the mean
#: block capacity (so a gain is always a finite number).
GAIN_FLOOR = 0.01


@dataclass(frozen=True)
class Server:
    """One online server as measured."""

    id: str
    span: Span
    throughput: float  # tokens/s through its whole span
    utilisation: float = 0.0  # share of its capacity in use, [0, 1]
    pool: str = ""
    movable: bool = True

    def __post_init__(self) -> None:
        if not (self.throughput >= 0 and math.isfinite(self.throughput)):
            raise ValueError(f"server {self.id}: throughput must be a finite number >= 0, got {self.throughput}")
        if not 0.0 <= self.utilisation <= 1.0:
            raise ValueError(f"server {self.id}: utilisation must be in [0, 1], got {self.utilisation}")

    @property
    def load(self) -> float:
        """Tokens/s of demand it carries through each block of its span."""
        return self.throughput * self.utilisation


@dataclass(frozen=True)
class Move:
    server: str
    old: Span
    new: Span

    def __str__(self) -> str:
        return f"{self.server} {self.old} -> {self.new}"


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]
    before: float  # bottleneck spare throughput now (tokens/s)
    after: float  # expected after the moves (equals `before` when there are none)
    gain: float  # relative gain of the best plan found, also when it was not worth moving
    bottleneck_block: int  # the block with the least spare throughput now
    spans: dict[str, Span]  # every server's span after the moves
    demand: tuple[float, ...]  # tokens/s of demand per block (what the plan assumed)
    reason: str  # what was decided, in words
    complete: bool = True  # the search reached a local optimum (was not cut by max_moves or a repeated server)

    @property
    def moved(self) -> bool:
        return bool(self.moves)


# ---- measures ------------------------------------------------------------------------------------------------------


def block_demand(num_blocks: int, servers: Iterable[Server]) -> list[float]:
    """Tokens/s of demand through each block: the load of the servers holding it."""
    servers = list(servers)
    return coverage(num_blocks, [s.span for s in servers], [s.load for s in servers])


def block_capacity(num_blocks: int, servers: Iterable[Server], spans: Mapping[str, Span] | None = None) -> list[float]:
    """Tokens/s each block can serve: the throughput of the servers holding it (at `spans`, else where they are)."""
    servers = list(servers)
    where = [spans.get(s.id, s.span) if spans is not None else s.span for s in servers]
    return coverage(num_blocks, where, [s.throughput for s in servers])


def spare(num_blocks: int, servers: Sequence[Server], demand: Sequence[float] | None = None,
          spans: Mapping[str, Span] | None = None) -> list[float]:
    """Spare tokens/s of each block: capacity (at `spans`) minus demand (by default, the servers' own load)."""
    demand = block_demand(num_blocks, servers) if demand is None else demand
    return [c - d for c, d in zip(block_capacity(num_blocks, servers, spans), demand, strict=True)]


def bottleneck(levels: Sequence[float]) -> tuple[float, int]:
    """(smallest level, first block that has it)."""
    block = min(range(len(levels)), key=lambda b: (levels[b], b))
    return float(levels[block]), block


def relative_gain(before: float, after: float, scale: float) -> float:
    """(after - before) / before, with `before` floored at GAIN_FLOOR x `scale` (the mean block capacity)."""
    floor = max(GAIN_FLOOR * scale, 1e-12)
    return (after - before) / max(before, floor)


# ---- the greedy search -----------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Servers as arrays; `level` is spare throughput per block, `cov` servers per block."""

    num_blocks: int
    starts: np.ndarray  # (n,) int
    lengths: np.ndarray  # (n,) int
    heights: np.ndarray  # (n,) float: throughput each block of the span gets
    movable: np.ndarray  # (n,) bool
    disruption: np.ndarray  # (n,) float: prefer moving servers with less of it
    level: np.ndarray  # (B,) float
    cov: np.ndarray  # (B,) int
    floor_cov: np.ndarray  # (B,) int: no block may go below this
    tol: float
    moved: set[int] = field(default_factory=set)

    def apply(self, index: int, start: int) -> None:
        old, length, h = int(self.starts[index]), int(self.lengths[index]), float(self.heights[index])
        self.level[old:old + length] -= h
        self.cov[old:old + length] -= 1
        self.level[start:start + length] += h
        self.cov[start:start + length] += 1
        self.starts[index] = start

    def bottom(self) -> tuple[float, int]:
        """(bottleneck level, how many blocks are within tolerance of it)."""
        low = float(self.level.min())
        return low, int((self.level < low + self.tol).sum())


def _best_move(state: _State) -> tuple[tuple[float, ...], int, int] | None:
    """The best single move from `state`: (key, server, new start), or None if no move helps.

    Vectorized per span length: for every server of that length and every window, the new
    bottleneck is min(prefix min, window min + height, suffix min) of the levels without the
    server, and the count of blocks below the threshold is counted with prefix sums.
    """
    low, count = state.bottom()
    threshold = low + state.tol
    floor_ok = low - state.tol
    best: tuple[tuple[float, ...], int, int] | None = None
    B = state.num_blocks
    candidates = np.flatnonzero(state.movable)
    if candidates.size == 0:
        return None
    for length in np.unique(state.lengths[candidates]):
        length = int(length)
        group = candidates[state.lengths[candidates] == length]
        W = B - length + 1
        if W < 2:
            continue  # a span of the whole model cannot move
        k = group.size
        blocks = np.arange(B)
        old = state.starts[group]
        in_old = (blocks[None, :] >= old[:, None]) & (blocks[None, :] < (old + length)[:, None])  # (k, B)
        h = state.heights[group]
        base = state.level[None, :] - h[:, None] * in_old  # levels without the server
        inf = np.full((k, 1), np.inf)
        prefix = np.concatenate([inf, np.minimum.accumulate(base, axis=1)], axis=1)[:, :W]  # min base[:, :a]
        suffix_all = np.concatenate([np.minimum.accumulate(base[:, ::-1], axis=1)[:, ::-1], inf], axis=1)
        suffix = suffix_all[:, length:length + W]  # min base[:, a + length:]
        window_min = np.lib.stride_tricks.sliding_window_view(base, length, axis=1).min(axis=2)  # (k, W)
        new_min = np.minimum(np.minimum(prefix, suffix), window_min + h[:, None])
        below = (base < threshold).astype(np.int64)
        below_lifted = ((base + h[:, None]) < threshold).astype(np.int64)
        zero = np.zeros((k, 1), dtype=np.int64)
        cum_below = np.concatenate([zero, np.cumsum(below, axis=1)], axis=1)
        cum_lifted = np.concatenate([zero, np.cumsum(below_lifted, axis=1)], axis=1)
        starts = np.arange(W)
        in_window_below = cum_below[:, starts + length] - cum_below[:, starts]
        in_window_lifted = cum_lifted[:, starts + length] - cum_lifted[:, starts]
        new_count = cum_below[:, -1:] - in_window_below + in_window_lifted
        # Redundancy: blocks of the old span that cannot lose a server must stay inside the new window.
        critical = in_old & (state.cov[None, :] - 1 < state.floor_cov[None, :])
        has_critical = critical.any(axis=1)
        first = np.where(has_critical, critical.argmax(axis=1), B)
        last = np.where(has_critical, B - 1 - critical[:, ::-1].argmax(axis=1), -1)
        allowed = (starts[None, :] <= first[:, None]) & (starts[None, :] + length - 1 >= last[:, None])
        allowed &= starts[None, :] != old[:, None]
        good = allowed & (new_min >= floor_ok) & (new_count < count)
        if not good.any():
            continue
        # Lexicographic: fewest blocks at the bottom, highest new bottleneck, least disruption, first server, first window.
        rows, cols = np.nonzero(good)
        order = np.lexsort((cols, group[rows], state.disruption[group[rows]], -new_min[rows, cols], new_count[rows, cols]))
        r, c = int(rows[order[0]]), int(cols[order[0]])
        key = (float(-new_count[r, c]), float(new_min[r, c]), float(-state.disruption[group[r]]), float(-group[r]), float(-c))
        if best is None or key > best[0]:
            best = (key, int(group[r]), c)
    return best


def search(state: _State, max_moves: int, max_steps: int | None = None,
            deadline: float | None = None) -> tuple[list[tuple[int, int, int]], list[float], bool]:
    """Greedy moves from `state` (changed in place). Returns (server, old start, new start) per step, the
    bottleneck after each step, and whether the search ended at a local optimum."""
    steps: list[tuple[int, int, int]] = []
    lows: list[float] = []
    while True:
        if max_steps is not None and len(steps) >= max_steps:
            return steps, lows, False
        if deadline is not None and time.perf_counter() > deadline:
            return steps, lows, False
        found = _best_move(state)
        if found is None:
            return steps, lows, True
        _, index, start = found
        if index in state.moved or len(state.moved) >= max_moves:
            return steps, lows, False  # a second move of one server, or one server too many: stop here
        steps.append((index, int(state.starts[index]), start))
        state.apply(index, start)
        state.moved.add(index)
        lows.append(state.bottom()[0])


def search_state(num_blocks: int, spans: Sequence[Span], heights: Sequence[float], level: np.ndarray,
           redundancy: int, movable: Sequence[bool], disruption: Sequence[float]) -> _State:
    cov = np.array(coverage(num_blocks, spans), dtype=np.int64)
    mean_capacity = float(np.mean(np.maximum(level, 0))) if level.size else 0.0
    scale = max(mean_capacity, float(np.max(heights, initial=0.0)), 1e-12)
    return _State(
        num_blocks=num_blocks,
        starts=np.array([s.start for s in spans], dtype=np.int64),
        lengths=np.array([len(s) for s in spans], dtype=np.int64),
        heights=np.array(heights, dtype=float),
        movable=np.array(movable, dtype=bool),
        disruption=np.array(disruption, dtype=float),
        level=level.astype(float).copy(),
        cov=cov,
        floor_cov=np.minimum(cov, redundancy),
        tol=_TOL * scale,
    )


# ---- rebalancing a running swarm -------------------------------------------------------------------------------------


def plan(
    num_blocks: int,
    servers: Sequence[Server],
    *,
    redundancy: int = 1,
    min_gain: float = 0.25,
    max_moves: int = 1,
    demand: Sequence[float] | None = None,
) -> Plan:
    """The moves (at most `max_moves` servers) that raise the bottleneck by more than `min_gain`, or none.

    `demand` is tokens/s per block; by default it is measured from the servers' own load
    (:func:`block_demand`). Give it explicitly to plan again "with the same metrics" after
    servers moved.
    """
    if num_blocks < 1 or redundancy < 1:
        raise ValueError("num_blocks and redundancy must be >= 1")
    if max_moves < 0 or min_gain < 0:
        raise ValueError("max_moves and min_gain must be >= 0")
    ids = [s.id for s in servers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"server ids must be unique: {ids}")
    for s in servers:
        if s.span.end > num_blocks:
            raise ValueError(f"server {s.id}: span {s.span} is outside the model's {num_blocks} blocks")
    demand = block_demand(num_blocks, servers) if demand is None else [float(d) for d in demand]
    if len(demand) != num_blocks:
        raise ValueError(f"demand has {len(demand)} blocks, the model {num_blocks}")
    capacity = np.array(block_capacity(num_blocks, servers))
    level = capacity - np.array(demand)
    before, block = bottleneck(list(level))
    current = {s.id: s.span for s in servers}
    scale = float(capacity.mean())

    def unchanged(reason: str, gain: float = 0.0, complete: bool = True) -> Plan:
        return Plan((), before, before, gain, block, dict(current), tuple(demand), reason, complete)

    if not servers:
        return unchanged("no servers")
    if max_moves == 0:
        return unchanged("moves are disabled (max_moves = 0)")
    state = search_state(num_blocks, [s.span for s in servers], [s.throughput for s in servers], level, redundancy,
                   [s.movable for s in servers], [s.utilisation for s in servers])
    steps, lows, complete = search(state, max_moves)
    if not steps:
        return unchanged("balanced: no move raises the bottleneck", complete=complete)
    best = max(lows)
    if best <= before + state.tol:
        return unchanged("balanced: no move within the limits raises the bottleneck", complete=complete)
    cut = next(i for i, low in enumerate(lows) if low >= best - state.tol) + 1
    gain = relative_gain(before, best, scale)
    if gain <= min_gain:
        return unchanged(f"best plan raises the bottleneck by {gain:.1%}, not more than the minimum gain {min_gain:.1%}",
                         gain, complete)
    moves = []
    spans = dict(current)
    for index, old, new in steps[:cut]:
        s = servers[index]
        length = len(s.span)
        moves.append(Move(s.id, Span(old, old + length), Span(new, new + length)))
        spans[s.id] = Span(new, new + length)
    after = bottleneck(spare(num_blocks, servers, demand, spans))[0]
    reason = f"moving {len(moves)} server(s) raises the bottleneck from {before:.3g} to {after:.3g} tokens/s ({gain:+.1%})"
    return Plan(tuple(moves), before, after, gain, block, spans, tuple(demand), reason, complete)


def apply_moves(servers: Sequence[Server], moves: Iterable[Move]) -> list[Server]:
    """The servers after `moves` (same ids, throughput and utilisation; new spans)."""
    new = {m.server: m.new for m in moves}
    return [Server(s.id, new.get(s.id, s.span), s.throughput, s.utilisation, s.pool, s.movable) for s in servers]


# ---- placing from scratch (the benchmark's fresh plan) ---------------------------------------------------------------
