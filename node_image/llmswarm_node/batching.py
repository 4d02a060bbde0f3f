"""One pass through a span for the steps of many inference sessions.

Each session keeps its own attention cache, with its own length. To run their steps
together, the pass builds a temporary cache: every session's keys and values, padded on
the left to the longest past, stacked along the batch. The attention mask marks the
padding (zeros), the position ids stay each session's own, so every row attends exactly
to its own past. After the pass, each session's cache is extended with the keys and
values its rows produced, and each session gets its own rows of the output.

Steps are grouped by blocks [start, end) and by the number of new tokens; a lone step
runs on its own cache directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmswarm_node.lora import ClientLora, rows_of
from llmswarm_node.span import SpanRunner


class HiddenRows:
    """Work on hidden states [rows, new tokens, hidden]."""

    hidden: torch.Tensor

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.hidden.shape[1]


@dataclass
class StepInput(HiddenRows):
    """One session's step: hidden [b, t, h], mask [b, past + t] or None, positions [b, t] or None,
    deep prompts [blocks, b, prefix, h] or None (a session's first step only; such a step runs alone)."""

    cache: DynamicCache
    past: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    prompts: torch.Tensor | None = None
    lora: ClientLora | None = None  # the session's own LoRA weights (lora.py): rows of a pass may each have their own

    def full_mask(self) -> torch.Tensor:
        if self.attention_mask is not None:
            return self.attention_mask.to(torch.int64)
        return torch.ones(self.rows, self.past + self.new_tokens, dtype=torch.int64)

    def full_positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids.to(torch.int64)
        return torch.arange(self.past, self.past + self.new_tokens).unsqueeze(0).expand(self.rows, -1)


def batchable(cache: DynamicCache) -> bool:
    """Only plain (full-attention) dynamic layers can be padded and stacked."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def run_steps(span: SpanRunner, start: int, end: int, steps: list[StepInput], adapter: str | None = None) -> list[torch.Tensor]:
    """Run steps with the same number of new tokens (and adapter) through blocks [start, end) in one pass."""
    if len(steps) == 1:
        step = steps[0]
        return [span.forward(step.hidden, step.attention_mask, step.position_ids, step.cache, start, end, step.prompts,
                             adapter=adapter, lora=rows_of(steps))]
    if any(s.prompts is not None for s in steps):
        raise ValueError("a step with deep prompts runs alone")
    new = steps[0].new_tokens
    if any(s.new_tokens != new for s in steps):
        raise ValueError("steps in one pass must have the same number of new tokens")
    longest = max(s.past for s in steps)
    rows = sum(s.rows for s in steps)
    num_layers = end - start
    combined = DynamicCache(config=span.view(start, end).config)
    reference = next((s.cache for s in steps if s.past > 0), None)
    if reference is not None:
        for index in range(num_layers):
            sample = reference.layers[index].keys
            keys = sample.new_zeros(rows, sample.shape[1], longest, sample.shape[3])
            values = torch.zeros_like(keys)
            row = 0
            for s in steps:
                if s.past:
                    layer = s.cache.layers[index]
                    keys[row:row + s.rows, :, longest - s.past:] = layer.keys
                    values[row:row + s.rows, :, longest - s.past:] = layer.values
                row += s.rows
            combined.update(keys, values, index)
    mask = torch.zeros(rows, longest + new, dtype=torch.int64)
    row = 0
    for s in steps:
        mask[row:row + s.rows, longest - s.past:] = s.full_mask()
        row += s.rows
    positions = torch.cat([s.full_positions() for s in steps])
    hidden = torch.cat([s.hidden.to(span.dtype) for s in steps])
    output = span.forward(hidden, mask, positions, combined, start, end, adapter=adapter, lora=rows_of(steps))
    # Each session's cache becomes a view of its own rows of the combined cache (past and
    # new tokens, without the padding): no copy, and the next update appends to it.
    outputs, row = [], 0
    for s in steps:
        own = slice(row, row + s.rows)
        first = longest - s.past
        for index in range(num_layers):
            shared, layer = combined.layers[index], s.cache.layers[index]
            if not layer.is_initialized:
                layer.lazy_initialization(shared.keys, shared.values)
            layer.keys = shared.keys[own, :, first:]
            layer.values = shared.values[own, :, first:]
        outputs.append(output[own])
        row += s.rows
    return outputs
