"""How much memory one pass through the span takes, before it runs: pure arithmetic, no torch.

The request limits (tokens, batch, session length) do not bound what a pass allocates: a
backward keeps every block's activations for autograd, eager attention holds a
``[rows, heads, new, past + new]`` score matrix, and a batched decode pass copies every
session's cache into one padded cache (batching.py). The scheduler asks :func:`pass_bytes`
for each pass, with the shapes it would run, and refuses (``too_large``) or splits what
does not fit the server's ``--compute-memory-bytes`` budget:

- a session step runs in chunks of the largest size that fits (:func:`largest_chunk`);
- a stateless forward runs its rows in slices that fit (:func:`rows_per_pass`);
- a backward runs whole, or block by block (only each block's input is kept between blocks,
  every block recomputed for its gradients) where whole does not fit (:func:`backward_plan`);
- a decode group takes only the companions that keep the stacked pass within the budget.

The counts are per element of the working set of the architectures' code (transformers'
Llama-like blocks: two norms, q/k/v/o projections, rotary embedding, an MLP of gate, up and
down), rounded up; tests/test_memory.py checks them against the peak that a real pass takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

MEMORY_EFFICIENT_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
FLOAT32 = 4  # bytes: eager attention takes its softmax in float32
SLACK = 5 / 4  # the allocator's own: freed blocks not yet reused, rounding to pages


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one transformer block that its working set is made of."""

    hidden: int
    intermediate: int  # MLP width (times the experts each token goes through, for a mixture of experts)
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int  # bytes per number of the compute dtype
    scores_materialized: bool = True  # eager attention: the [rows, heads, new, past + new] scores exist at once
    weight_scratch: int = 0  # bytes a quantized block dequantizes at once (its widest linear layer)

    @property
    def queries(self) -> int:
        return self.heads * self.head_dim

    @property
    def keys(self) -> int:
        return self.kv_heads * self.head_dim

    def kv_bytes_per_token(self) -> int:
        """Cache bytes (keys and values) one token takes in one block."""
        return 2 * self.keys * self.itemsize

    @classmethod
    def of(cls, config: Any, kv_heads: int, head_dim: int, itemsize: int, quantized: bool = False) -> BlockShape:
        """The shape of a transformers config's blocks (`kv_heads`, `head_dim`: llmswarm_core.arch.kv_shape)."""
        hidden = int(config.hidden_size)
        intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
                           or 4 * hidden)
        intermediate *= int(getattr(config, "num_experts_per_tok", None) or 1)
        heads = int(config.num_attention_heads)
        implementation = getattr(config, "_attn_implementation", None)
        return cls(hidden, intermediate, heads, kv_heads, head_dim, itemsize,
                   scores_materialized=implementation not in MEMORY_EFFICIENT_ATTENTION,
                   weight_scratch=hidden * max(intermediate, 3 * hidden) * itemsize if quantized else 0)


@dataclass(frozen=True)
class PassShape:
    """One pass: `rows` x `new` tokens through `blocks` blocks, attending to `past` cached tokens too."""

    rows: int
    new: int
    blocks: int
    past: int = 0  # the longest past of the pass (a stacked decode pads every cache to it)
    grad: bool = False  # autograd keeps the activations of every block for a backward
    per_block: bool = False  # with grad: block by block, keeping only each block's input between blocks
    stacked_cache: bool = False  # batched decode: every session's cache copied into one padded cache


def _block_activations(block: BlockShape, tokens: int, saved: bool) -> int:
    """Numbers one block makes over `tokens` tokens besides attention scores: alive at once in a pass without
    autograd, or `saved` for a backward (rounded up).

    Per token, saved: the input and residual, two norm outputs, q, k, v and their rotated copies,
    keys and values repeated for every query head (grouped-query attention), the attention output
    and its projection, gate, up, activation and their product, the MLP output. Without autograd,
    most of them are freed as the block goes on: the residual stream, q, k, v and the MLP's widest part.
    """
    h, q, k, i = block.hidden, block.queries, block.keys, block.intermediate
    if saved:
        return tokens * (6 * h + 4 * q + 4 * k + 4 * i)
    return tokens * (4 * h + 2 * q + 2 * k + 3 * i)


def _attention(block: BlockShape, rows: int, new: int, total: int) -> int:
    """Bytes of one block's attention over `total` (past + new) keys: scores, the mask, repeated past keys and values."""
    mask = rows * new * total * (block.itemsize if block.scores_materialized else 1)  # eager: an additive float mask
    repeated = 2 * rows * total * block.queries * block.itemsize  # keys and values expanded to every query head
    scores = rows * block.heads * new * total * (2 * block.itemsize + FLOAT32) if block.scores_materialized else 0
    return mask + repeated + scores


def pass_bytes(block: BlockShape, shape: PassShape) -> int:
    """The peak bytes a pass allocates beyond the weights and the caches it starts with (an upper estimate)."""
    return int(SLACK * _pass_bytes(block, shape))


def _pass_bytes(block: BlockShape, shape: PassShape) -> int:
    rows, new, blocks = shape.rows, shape.new, shape.blocks
    total = shape.past + new
    tokens = rows * new
    io = 4 * tokens * block.hidden * block.itemsize  # input (in the compute dtype), output, its copy off the device
    attention = _attention(block, rows, new, total)
    cache_growth = 2 * rows * total * block.kv_bytes_per_token() if shape.past else 0  # one block's keys, values anew
    if shape.stacked_cache:  # every cache copied, padded to the longest, into one cache for the pass
        cache_growth += blocks * rows * total * block.kv_bytes_per_token()
    if not shape.grad:
        working = _block_activations(block, tokens, saved=False) * block.itemsize + attention
        return io + working + cache_growth + block.weight_scratch
    one_block = _block_activations(block, tokens, saved=True) * block.itemsize + attention
    gradients = 2 * tokens * block.hidden * block.itemsize + one_block  # grads in and out, one block's backward
    if shape.per_block:  # every block's input kept, then one block's activations at a time
        kept = blocks * tokens * block.hidden * block.itemsize + one_block
    else:
        kept = blocks * one_block
    return io + kept + gradients + cache_growth + block.weight_scratch


def fits(block: BlockShape, shape: PassShape, budget: int) -> bool:
    return pass_bytes(block, shape) <= budget


def largest_chunk(block: BlockShape, rows: int, new: int, past: int, blocks: int, limit: int, budget: int) -> int:
    """The most new tokens (at most `limit` and `new`) per pass of a `new`-token step after `past` tokens that fits
    `budget`, each chunk attending to up to all `past + new` tokens; 0 where not even one token fits."""
    def fit(size: int) -> bool:
        return fits(block, PassShape(rows, size, blocks, past + new - size), budget)

    return _largest(min(limit, new), fit)


def rows_per_pass(block: BlockShape, rows: int, new: int, blocks: int, budget: int) -> int:
    """The most rows of a stateless forward ([rows, new] tokens) that one pass within `budget` can take; 0: none."""
    return _largest(rows, lambda size: fits(block, PassShape(size, new, blocks), budget))


BackwardPlan = Literal["whole", "per_block"]


def backward_plan(block: BlockShape, rows: int, new: int, blocks: int, budget: int) -> BackwardPlan | None:
    """How a backward fits `budget`: whole, block by block, or not at all (None)."""
    if fits(block, PassShape(rows, new, blocks, grad=True), budget):
        return "whole"
    if fits(block, PassShape(rows, new, blocks, grad=True, per_block=True), budget):
        return "per_block"
    return None


def _largest(upper: int, fit: Callable[[int], bool]) -> int:
    """The largest n in [1, upper] with fit(n) (fit is monotone: true up to some n), or 0."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fit(middle):
            low = middle
        else:
            high = middle - 1
    return low
