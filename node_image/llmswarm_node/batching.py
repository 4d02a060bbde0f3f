"""One pass through a span for the steps of many inference sessions.

Each session keeps its own attention cache, with its own length. To run their steps
together, the pass builds a temporary cache: every session's keys and values, padded on
the left to the longest past, stacked along the batch. The attention mask marks the
padding (zeros), the position ids stay each session's own, so every row attends exactly
to its own past. After the pass, each session's cache is extended with the keys and
values its rows produced, and each session gets its own rows of the output.

Steps are grouped by blocks [start, end) and by the number of new tokens; a lone step
runs on its own cache directly. Sessions' first steps (their prompts, no past yet) share a
pass whatever their lengths: each is padded on the right to the longest, where causal
attention keeps the padding out of every real token's view, and each session's cache keeps
only its own tokens' keys and values (:func:`_run_first_steps`). Local batched ``generate()``
prefills its prompts in one pass too; one pass per distinct prompt length cost 16 new
sessions about a second on the 2-core machine.

Sessions that generate together keep meeting in the same group, pass after pass. Then their
caches are still the views of the last pass's combined cache, and that cache, extended by the
pass, already holds every row padded as this pass needs it: the pass runs on it as it is
(:class:`_Group`) instead of copying every session's keys and values into a new one. With 16
sessions through 10 SmolLM2 blocks the copies took 14 of a pass's 41 ms. Any change (a session
more or less, another order, a session that stepped alone in between) builds it afresh.
"""

from __future__ import annotations

import weakref
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


class _Group:
    """The combined cache of the last pass of a group of sessions, and the views of it that their caches hold."""

    def __init__(self, combined: DynamicCache, caches: list[DynamicCache], views: list[list[torch.Tensor]],
                 length: int) -> None:
        self.combined = combined
        self.caches = [weakref.ref(cache) for cache in caches]  # in the order of the pass's rows
        self.views = views  # per session, its layers' keys as the pass left them
        self.length = length  # the combined cache's length after the pass

    def order(self, steps: list[StepInput], longest: int) -> list[int] | None:
        """The indices of `steps` in the group's row order, where they are the group's sessions, each cache untouched
        since the last pass (its layers still the views that pass left); None otherwise."""
        if len(steps) != len(self.caches) or longest != self.length:
            return None
        where = {id(s.cache): i for i, s in enumerate(steps)}
        order = []
        for cache_ref, views in zip(self.caches, self.views, strict=True):
            cache = cache_ref()
            index = where.get(id(cache)) if cache is not None else None
            if index is None or not all(layer.keys is view for layer, view in zip(cache.layers, views, strict=True)):
                return None
            order.append(index)
        return order


_GROUP_ATTRIBUTE = "_llmswarm_group"  # on a session's cache: the _Group whose combined cache it views


def _last_group(steps: list[StepInput], longest: int) -> tuple[_Group, list[int]] | None:
    """The group these steps' sessions formed in their last pass, with the steps' indices in its row order."""
    group = getattr(steps[0].cache, _GROUP_ATTRIBUTE, None)
    order = group.order(steps, longest) if isinstance(group, _Group) else None
    return None if order is None else (group, order)


def _combine(span: SpanRunner, start: int, end: int, steps: list[StepInput], longest: int, rows: int) -> DynamicCache:
    """Every session's keys and values, padded on the left to `longest`, stacked along the batch."""
    combined = DynamicCache(config=span.view(start, end).config)
    reference = next((s.cache for s in steps if s.past > 0), None)
    if reference is not None:
        for index in range(end - start):
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
    return combined


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
        if any(s.past for s in steps):
            raise ValueError("steps in one pass must have the same number of new tokens, or all be first steps")
        return _run_first_steps(span, start, end, steps, adapter)
    longest = max(s.past for s in steps)
    last = _last_group(steps, longest)
    if last is not None and last[1] != list(range(len(steps))):  # the same sessions, arrived in another order
        outputs = run_steps(span, start, end, [steps[i] for i in last[1]], adapter)
        return [outputs[last[1].index(i)] for i in range(len(steps))]
    rows = sum(s.rows for s in steps)
    num_layers = end - start
    combined = last[0].combined if last is not None else _combine(span, start, end, steps, longest, rows)
    mask = torch.zeros(rows, longest + new, dtype=torch.int64)
    row = 0
    for s in steps:
        mask[row:row + s.rows, longest - s.past:] = s.full_mask()
        row += s.rows
    positions = torch.cat([s.full_positions() for s in steps])
    hidden = torch.cat([s.hidden.to(span.dtype) for s in steps])
    output = span.forward(hidden, mask, positions, combined, start, end, adapter=adapter, lora=rows_of(steps))
    outputs = _hand_back(steps, combined, output, num_layers, [slice(longest - s.past, None) for s in steps],
                         [slice(None)] * len(steps))
    kept = _Group(combined, [s.cache for s in steps], [[layer.keys for layer in s.cache.layers] for s in steps],
                  longest + new)
    for s in steps:
        setattr(s.cache, _GROUP_ATTRIBUTE, kept)
    return outputs


def _run_first_steps(span: SpanRunner, start: int, end: int, steps: list[StepInput], adapter: str | None) -> list[torch.Tensor]:
    """First steps of different lengths in one pass, each padded on the right to the longest."""
    longest = max(s.new_tokens for s in steps)
    rows = sum(s.rows for s in steps)
    hidden = torch.zeros(rows, longest, steps[0].hidden.shape[2], dtype=span.dtype)
    mask = torch.zeros(rows, longest, dtype=torch.int64)
    positions = torch.zeros(rows, longest, dtype=torch.int64)
    row = 0
    for s in steps:
        own, n = slice(row, row + s.rows), s.new_tokens
        hidden[own, :n] = s.hidden.to(span.dtype)
        mask[own, :n] = s.full_mask()
        own_positions = s.full_positions()
        positions[own, :n] = own_positions
        positions[own, n:] = own_positions[:, -1:] + torch.arange(1, longest - n + 1)  # the padding's, never attended
        row += s.rows
    combined = DynamicCache(config=span.view(start, end).config)
    output = span.forward(hidden, mask, positions, combined, start, end, adapter=adapter, lora=rows_of(steps))
    own = [slice(None, s.new_tokens) for s in steps]  # without the padding on the right
    return _hand_back(steps, combined, output, end - start, own, own)


def _hand_back(steps: list[StepInput], combined: DynamicCache, output: torch.Tensor, num_layers: int,
               cache_tokens: list[slice], output_tokens: list[slice]) -> list[torch.Tensor]:
    """Each session's rows of the pass's output (its `output_tokens`), and its cache made a view of its own rows of
    the combined cache (its `cache_tokens`, without the padding): no copy, and the next update appends to it."""
    outputs, row = [], 0
    for s, own_tokens, own_outputs in zip(steps, cache_tokens, output_tokens, strict=True):
        own = slice(row, row + s.rows)
        for index in range(num_layers):
            shared, layer = combined.layers[index], s.cache.layers[index]
            if not layer.is_initialized:
                layer.lazy_initialization(shared.keys, shared.values)
            layer.keys = shared.keys[own, :, own_tokens]
            layer.values = shared.values[own, :, own_tokens]
        outputs.append(output[own, own_outputs])
        row += s.rows
    return outputs
