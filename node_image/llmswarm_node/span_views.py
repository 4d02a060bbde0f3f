"""Views of a loaded span: base models that run a sub-range [a, b) of its blocks.

A request may ask for a sub-range [a, b) of the span (a client chain may overlap two
servers). For that the span builds a *view*: a shallow copy of the base model whose
block list holds copies of blocks a..b that share their weights but are renumbered
from 0, so a fresh cache for the view is indexed the way transformers expects.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import DynamicCache, PretrainedConfig

from llmswarm_node.span_loader import LoadedSpan


class SpanViews:
    """The views of one loaded span, built on first use and kept."""

    def __init__(self, span: LoadedSpan) -> None:
        self.span = span
        self._views: dict[tuple[int, int], nn.Module] = {(span.start, span.end): span.base}

    def view(self, start: int, end: int) -> nn.Module:
        """A base model running blocks [start, end) of the span (global indices)."""
        span = self.span
        if not span.start <= start < end <= span.end:
            raise ValueError(f"blocks [{start}, {end}) are not inside this server's span [{span.start}, {span.end})")
        key = (start, end)
        if key not in self._views:
            own = span.layers()[start - span.start : end - span.start]
            shared = {id(t): t for layer in own for t in [*layer.parameters(), *layer.buffers()]}
            renumbered = nn.ModuleList()
            for new_index, layer in enumerate(own):
                clone = copy.deepcopy(layer, memo=dict(shared))
                for module in clone.modules():
                    if hasattr(module, "layer_idx"):
                        module.layer_idx = new_index
                renumbered.append(clone)
            view = copy.copy(span.base)
            view._modules = dict(span.base._modules)
            view._modules[span.arch.layers] = renumbered
            view.config = self._config(start, end)
            self._views[key] = view
        return self._views[key]

    def new_cache(self, start: int, end: int) -> DynamicCache:
        """An empty attention cache for blocks [start, end)."""
        return DynamicCache(config=self.view(start, end).config)

    def _config(self, start: int, end: int) -> PretrainedConfig:
        """The base model's own config (attention implementation included), cut to [start, end)."""
        span = self.span
        config = copy.deepcopy(span.base.config)
        config.num_hidden_layers = end - start
        if getattr(span.config, "layer_types", None) is not None:
            config.layer_types = list(span.config.layer_types)[start - span.start : end - span.start]
        return config
