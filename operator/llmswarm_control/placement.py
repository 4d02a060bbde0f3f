"""Placement: which span of blocks each server holds. Pure, deterministic, no I/O.

One function, :func:`place`, serves both substrates: the Kubernetes operator calls it with
the pools of a ``Swarm`` (GPU memory, relative speed, min/max servers) and the local
substrate (``llmswarm up``) calls it through :func:`place_spans` with one pool of equal
servers.

Spans are half-open ``[start, end)``. The algorithm, in three steps:

1. **Capacity.** A server of a pool holds at most ``memory // (block bytes + cache bytes
   per block)`` blocks (and never more than the model, or than the pool's fixed
   ``blocks_per_server``). A pool whose servers cannot hold one block is not used.
2. **Lengths.** Every pool starts at its ``min_servers``. Span lengths follow speed:
   ``length = min(capacity, ceil(k * speed))`` with the smallest common ``k`` that gives
   ``redundancy * num_blocks`` block slots in total, so faster servers take
   proportionally longer spans and every server needs about the same time for its part
   of a forward pass (a balanced pipeline). Servers with a fixed ``blocks_per_server``
   keep it.
3. **Windows.** Longest spans first, each server takes the window whose block coverage,
   sorted ascending, is lexicographically smallest (it reinforces the weakest blocks, as
   Petals' block selection does); ties go to the window with the least throughput, then
   to the leftmost one.

If some block ends up with fewer than ``redundancy`` servers, ``k`` grows (longer spans,
up to the capacity), then a server is added to the pool whose servers hold the most
blocks (then the fastest, then the first declared), up to each pool's ``max_servers``.
When all pools are at their maximum and blocks are still short, the result is a
best-effort placement that says which blocks are short and how much memory is missing
(:attr:`Placement.message`); :func:`place` does not raise for that.

Blocks may already be held by servers the placement does not place (``covered``: servers per
block, e.g. outside servers that joined a Kubernetes swarm). They count towards the
redundancy: the block slots to fill are only the missing copies, and windows start from that
coverage, so the placed servers go where the others leave blocks weak.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmswarm_core.arch import kv_bytes_per_token
from llmswarm_core.spans import Span, coverage, ranges

GIB = 1024**3

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")

_EPS = 1e-9


class PlacementError(ValueError):
    """The servers cannot cover the model with the asked redundancy."""

    def __init__(self, message: str, uncovered: list[int]) -> None:
        super().__init__(message)
        self.uncovered = uncovered


@dataclass(frozen=True)
class Pool:
    """Servers of one kind: same memory, same speed."""

    name: str
    memory_bytes: int | None = None  # what one server may use for blocks + attention cache; None: unlimited
    speed: float = 1.0  # relative speed (any unit, compared between pools)
    min_servers: int = 1
    max_servers: int | None = None  # None: exactly min_servers
    blocks_per_server: int | None = None  # fix the span length instead of deriving it from speed

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a pool needs a name")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise ValueError(f"pool {self.name}: memory_bytes must be >= 0")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"pool {self.name}: speed must be a positive number")
        if self.min_servers < 0:
            raise ValueError(f"pool {self.name}: min_servers must be >= 0")
        if self.max_servers is not None and self.max_servers < self.min_servers:
            raise ValueError(f"pool {self.name}: max_servers ({self.max_servers}) < min_servers ({self.min_servers})")
        if self.blocks_per_server is not None and self.blocks_per_server < 1:
            raise ValueError(f"pool {self.name}: blocks_per_server must be >= 1")

    @property
    def limit(self) -> int:
        return self.min_servers if self.max_servers is None else self.max_servers


@dataclass(frozen=True)
class BlockCost:
    """Memory one block costs on a server: its weights plus its share of the attention cache."""

    weight_bytes: int = 0
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.weight_bytes < 0 or self.cache_bytes < 0:
            raise ValueError("block costs must be >= 0")

    @property
    def total(self) -> int:
        return self.weight_bytes + self.cache_bytes


@dataclass(frozen=True)
class PlacedServer:
    pool: str
    index: int  # position among the servers of its pool
    span: Span


@dataclass(frozen=True)
class Placement:
    num_blocks: int
    redundancy: int
    servers: tuple[PlacedServer, ...]
    coverage: tuple[int, ...]  # placed servers per block
    capacity: dict[str, int]  # most blocks one server of each pool can hold
    missing_bytes: int = 0  # memory the short blocks lack: sum of missing copies x bytes per block
    message: str = ""  # empty when feasible; otherwise what is short and why
    notes: tuple[str, ...] = field(default=())  # pools that cannot take part, and why
    covered: tuple[int, ...] = ()  # servers per block that were there already (not placed); empty: none

    @property
    def total_coverage(self) -> list[int]:
        """Servers per block: the placed ones plus those that were there already."""
        return with_covered(list(self.coverage), self.covered)

    @property
    def short_blocks(self) -> list[int]:
        """Blocks held by fewer than `redundancy` servers (placed or already there)."""
        return [b for b, c in enumerate(self.total_coverage) if c < self.redundancy]

    @property
    def feasible(self) -> bool:
        return not self.short_blocks

    @property
    def min_replicas(self) -> int:
        return min(self.total_coverage, default=0)

    def count(self, pool: str) -> int:
        return sum(1 for s in self.servers if s.pool == pool)


# ---- estimates for callers (the operator computes block bytes from the model's shape) ----------------------------


def llama_block_params(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
) -> int:
    """Parameters of one Llama-style decoder block (attention, gated MLP, two RMS norms)."""
    kv_heads = num_key_value_heads or num_attention_heads
    head = head_dim or hidden_size // num_attention_heads
    q = o = hidden_size * num_attention_heads * head
    k = v = hidden_size * kv_heads * head
    mlp = 3 * hidden_size * intermediate_size
    return q + k + v + o + mlp + 2 * hidden_size


def estimate_block_bytes(params_per_block: int, hidden_size: int, dtype: str = "float32", quantization: str = "none") -> int:
    """Bytes of one block's weights in memory for a dtype and quantization.

    ``none`` keeps every weight in ``dtype``. ``int8`` (LLM.int8) stores linear weights in
    one byte plus one float32 scale per row; ``nf4`` stores them in half a byte plus one
    float32 absmax per 64 weights. Norm weights (about ``2 * hidden_size``) stay in ``dtype``.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})")
    if params_per_block < 1 or hidden_size < 1:
        raise ValueError("params_per_block and hidden_size must be >= 1")
    width = DTYPE_BYTES[dtype]
    if quantization == "none":
        return params_per_block * width
    norms = min(2 * hidden_size, params_per_block)
    linear = params_per_block - norms
    if quantization == "int8":
        quantized = linear + 4 * math.ceil(linear / hidden_size)
    else:
        quantized = math.ceil(linear / 2) + 4 * math.ceil(linear / 64)
    return quantized + norms * width


def kv_cache_bytes_per_token(num_key_value_heads: int, head_dim: int, dtype: str = "float32") -> int:
    """Attention-cache bytes one token takes in one block (keys and values, in the compute dtype)."""
    return kv_bytes_per_token(num_key_value_heads, head_dim, DTYPE_BYTES[dtype])


# ---- placement -----------------------------------------------------------------------------------------------------


def with_covered(counts: list[int], covered: Sequence[int]) -> list[int]:
    """`counts` plus `covered`, block by block (`covered` may be empty: nothing there already)."""
    return [c + (covered[b] if b < len(covered) else 0) for b, c in enumerate(counts)]


def missing_copies(num_blocks: int, redundancy: int, covered: Sequence[int]) -> list[int]:
    """Copies of each block still to place so that it reaches `redundancy` with what `covered` holds."""
    return [max(0, redundancy - c) for c in with_covered([0] * num_blocks, covered)]


def best_window(coverage: list[int], size: int) -> int:
    """Start of the window of `size` blocks whose sorted coverage is lexicographically smallest."""
    starts = range(len(coverage) - size + 1)
    return min(starts, key=lambda s: (sorted(coverage[s:s + size]), s))


def pool_capacity(pool: Pool, num_blocks: int, cost: BlockCost) -> int:
    """Most blocks one server of `pool` can hold."""
    cap = num_blocks
    if pool.memory_bytes is not None and cost.total > 0:
        cap = min(cap, pool.memory_bytes // cost.total)
    if pool.blocks_per_server is not None:
        cap = min(cap, pool.blocks_per_server)
    return max(cap, 0)


@dataclass(frozen=True)
class _Slot:
    order: int  # pool order
    pool: Pool
    cap: int


def place(
    num_blocks: int,
    pools: Sequence[Pool],
    redundancy: int = 1,
    cost: BlockCost | None = None,
    covered: Sequence[int] = (),
) -> Placement:
    """Servers and spans for `pools` so that every block is held by at least `redundancy` servers.

    `covered` gives, per block, servers that hold it already and are not placed here: only the
    missing copies are placed. Each pool still runs its ``min_servers``. Deterministic: the same
    input gives the same placement. Never raises for pools that are too small: the result is then
    not :attr:`~Placement.feasible` and says why.
    """
    if num_blocks < 1 or redundancy < 1:
        raise ValueError("num_blocks and redundancy must be >= 1")
    if len(covered) not in (0, num_blocks) or any(c < 0 for c in covered):
        raise ValueError(f"covered must give a count >= 0 for each of the {num_blocks} blocks")
    base = tuple(min(c, redundancy) for c in covered)  # more than the redundancy changes nothing
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pool names must be unique: {names}")
    cost = cost or BlockCost()
    caps = {p.name: pool_capacity(p, num_blocks, cost) for p in pools}
    notes = tuple(
        f"pool {p.name}: one server ({_gib(p.memory_bytes or 0)} usable) cannot hold a single block "
        f"({_gib(cost.total)} with its attention cache)"
        for p in pools if caps[p.name] == 0 and p.limit > 0
    )
    usable = [_Slot(i, p, caps[p.name]) for i, p in enumerate(pools) if caps[p.name] > 0]
    counts = {s.pool.name: s.pool.min_servers for s in usable}
    target = sum(missing_copies(num_blocks, redundancy, base))

    def total_capacity() -> int:
        return sum(counts[s.pool.name] * s.cap for s in usable)

    while True:
        if total_capacity() >= target:
            attempt = _arrange_counts(num_blocks, redundancy, usable, counts, base)
            if attempt is not None:
                return _result(num_blocks, redundancy, attempt, caps, cost, notes, usable, counts, base)
        growable = [s for s in usable if counts[s.pool.name] < s.pool.limit]
        if not growable:
            break
        pick = max(growable, key=lambda s: (s.cap, s.pool.speed, -s.order))
        counts[pick.pool.name] += 1
    best = _arrange(num_blocks, _lengths_for(_servers(usable, counts), None), base)
    return _result(num_blocks, redundancy, best, caps, cost, notes, usable, counts, base)


def _servers(usable: list[_Slot], counts: dict[str, int]) -> list[tuple[_Slot, int]]:
    return [(slot, index) for slot in usable for index in range(counts[slot.pool.name])]


def _candidates(servers: list[tuple[_Slot, int]]) -> list[float]:
    """Values of k where some variable-length server's span grows by one block."""
    values = {m / slot.pool.speed for slot, _ in servers if slot.pool.blocks_per_server is None
              for m in range(1, slot.cap + 1)}
    return sorted(values)


def _length(slot: _Slot, k: float | None) -> int:
    if slot.pool.blocks_per_server is not None or k is None:
        return slot.cap
    return min(slot.cap, max(1, math.ceil(k * slot.pool.speed - _EPS)))


def _lengths_for(servers: list[tuple[_Slot, int]], k: float | None) -> list[tuple[_Slot, int, int]]:
    return [(slot, index, _length(slot, k)) for slot, index in servers]


def _arrange_counts(
    num_blocks: int, redundancy: int, usable: list[_Slot], counts: dict[str, int], base: Sequence[int] = ()
) -> list[tuple[_Slot, int, Span]] | None:
    """A feasible arrangement for these server counts, trying longer spans if the shortest fail."""
    servers = _servers(usable, counts)
    target = sum(missing_copies(num_blocks, redundancy, base))
    candidates = _candidates(servers)
    totals = [sum(_length(slot, k) for slot, _ in servers) for k in candidates] if candidates else []
    first = bisect.bisect_left(totals, target) if totals else 0
    tries: list[float | None] = []
    step = 1
    index = first
    while index < len(candidates):
        tries.append(candidates[index])
        index = first + step
        step *= 2
    tries.append(None)  # every server at its capacity
    seen: set[tuple[int, ...]] = set()
    for k in tries:
        lengths = _lengths_for(servers, k)
        signature = tuple(length for _, _, length in lengths)
        if signature in seen or sum(signature) < target:
            continue
        seen.add(signature)
        arrangement = _arrange(num_blocks, lengths, base)
        if min(with_covered(coverage(num_blocks, [span for _, _, span in arrangement]), base)) >= redundancy:
            return arrangement
    return None


def _arrange(num_blocks: int, lengths: list[tuple[_Slot, int, int]], base: Sequence[int] = ()) -> list[tuple[_Slot, int, Span]]:
    coverage = with_covered([0] * num_blocks, base)
    throughput = [0.0] * num_blocks
    placed = []
    for slot, index, length in sorted(lengths, key=lambda t: (-t[2], -t[0].pool.speed, t[0].order, t[1])):
        rate = slot.pool.speed / length

        def key(s: int, length: int = length) -> tuple[list[int], list[float], int]:
            return sorted(coverage[s:s + length]), sorted(throughput[s:s + length]), s

        start = min(range(num_blocks - length + 1), key=key)
        for block in range(start, start + length):
            coverage[block] += 1
            throughput[block] = round(throughput[block] + rate, 9)
        placed.append((slot, index, Span(start, start + length)))
    return placed


def _result(
    num_blocks: int,
    redundancy: int,
    arrangement: list[tuple[_Slot, int, Span]],
    caps: dict[str, int],
    cost: BlockCost,
    notes: tuple[str, ...],
    usable: list[_Slot],
    counts: dict[str, int],
    base: tuple[int, ...] = (),
) -> Placement:
    ordered = sorted(enumerate(arrangement), key=lambda t: (t[1][0].order, t[0]))
    servers: list[PlacedServer] = []
    per_pool: dict[str, int] = {}
    for _, (slot, _, span) in ordered:
        index = per_pool.get(slot.pool.name, 0)
        per_pool[slot.pool.name] = index + 1
        servers.append(PlacedServer(slot.pool.name, index, span))
    counted = coverage(num_blocks, [span for _, _, span in arrangement])
    total = with_covered(counted, base)
    short = [b for b, c in enumerate(total) if c < redundancy]
    missing = sum(missing_copies(num_blocks, redundancy, total))
    missing_bytes = missing * cost.total
    message = ""
    if short:
        capacity = sum(counts[s.pool.name] * s.cap for s in usable)
        used = ", ".join(f"{counts[s.pool.name]} x {s.pool.name} (up to {s.cap} blocks each)" for s in usable) or "no usable server"
        message = (
            f"{used} cannot hold {num_blocks} blocks {redundancy} times: blocks {ranges(short)} have fewer than "
            f"{redundancy} servers; {missing} block copies are missing"
        )
        if cost.total:
            message += f" ({_gib(missing_bytes)} of server memory at {_gib(cost.total)} per block)"
        if any(base):
            message += f" (servers already there hold {sum(base)} of the copies)"
        if capacity >= sum(missing_copies(num_blocks, redundancy, base)):
            message += "; the memory is enough in total but the spans cannot be arranged: allow more servers"
        else:
            message += "; add servers or memory (raise maxServers, or use a pool with more memory or quantization)"
        if notes:
            message += "; " + "; ".join(notes)
    return Placement(
        num_blocks=num_blocks, redundancy=redundancy, servers=tuple(servers), coverage=tuple(counted),
        capacity=dict(caps), missing_bytes=missing_bytes, message=message, notes=notes, covered=base,
    )


# ---- equal servers (the local substrate) ---------------------------------------------------------------------------


def place_spans(
    num_blocks: int,
    servers: int | None = None,
    redundancy: int = 1,
    blocks_per_server: int | None = None,
) -> list[Span]:
    """Spans for equal servers so that every block is held by at least `redundancy` of them.

    Give `servers`, `blocks_per_server`, or both. With only `servers`, spans are as short
    as possible: ceil(redundancy * num_blocks / servers). With only `blocks_per_server`,
    the fewest servers that can reach the redundancy are used. This is :func:`place`
    with one pool of `servers` equal servers whose span length is fixed.
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
    pool = Pool("servers", min_servers=servers, blocks_per_server=blocks_per_server)
    placement = place(num_blocks, [pool], redundancy)
    short = placement.short_blocks
    if short:
        raise PlacementError(
            f"{servers} servers of {blocks_per_server} blocks cannot hold {num_blocks} blocks {redundancy} times: "
            f"blocks {ranges(short)} have fewer than {redundancy} servers "
            f"(need at least {redundancy * math.ceil(num_blocks / blocks_per_server)} servers)",
            short,
        )
    return [s.span for s in placement.servers]


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"
