"""A span of transformer blocks, loaded alone, run with the architecture's own code.

The span is the architecture's base model (``LlamaModel``, ``BloomModel``...) built for
the span's blocks only, with its embeddings shrunk to nothing and its final norm (and
BLOOM's embedding norm) replaced by identities: its ``forward(inputs_embeds=...)`` then
runs exactly the blocks [start, end) with transformers' own masks, rotary embeddings,
ALiBi and KV cache. Only the span's weights are read from disk.

A request may ask for a sub-range [a, b) of the span (a client chain may overlap two
servers). For that the span builds a *view*: a shallow copy of the base model whose
block list holds copies of blocks a..b that share their weights but are renumbered
from 0, so a fresh cache for the view is indexed the way transformers expects.
"""

from __future__ import annotations

import copy
import inspect
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, DynamicCache, PretrainedConfig

from llmswarm.arch import Architecture, span_config
from llmswarm.source import ModelDir, load_state


class SpanModel:
    """Blocks [start, end) of a model, ready to run forward with or without a cache."""

    def __init__(
        self,
        source: ModelDir,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.start, self.end = start, end
        self.dtype = dtype
        self.arch: Architecture = source.arch
        self.config: PretrainedConfig = span_config(source.config, start, end)
        self.hidden_size = int(source.config.hidden_size)
        self.base = self._load_base(progress)
        self.base.eval().requires_grad_(False)
        self._accepts_position_ids = "position_ids" in inspect.signature(self.base.forward).parameters
        self._views: dict[tuple[int, int], nn.Module] = {(start, end): self.base}

    def _load_base(self, progress: bool) -> nn.Module:
        """Read only the span's blocks and load them with transformers' own loader."""
        state: dict[str, torch.Tensor] = {}
        blocks = range(self.start, self.end)
        for block in tqdm(blocks, desc=f"reading blocks {self.start}:{self.end}", unit="block", disable=not progress):
            for key, tensor in self.source.block_state(block, dtype=self.dtype).items():
                state[f"{self.arch.layers}.{block - self.start}.{key}"] = tensor
        shell_config = copy.deepcopy(self.config)
        shell_config.vocab_size = 1  # the server never embeds tokens
        shell_config.pad_token_id = None
        model_class = AutoModel._model_mapping[type(shell_config)]
        base, info = load_state(model_class, shell_config, state, self.dtype)
        del state
        block_prefix = f"{self.arch.layers}."
        missing = sorted(k for k in info["missing_keys"] if k.startswith(block_prefix) and not k.endswith(_NON_PERSISTENT_SUFFIXES))
        if missing or info["unexpected_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"blocks [{self.start}, {self.end}) do not match the architecture: missing {missing}, "
                f"unexpected {sorted(info['unexpected_keys'])}, mismatched {sorted(info['mismatched_keys'])}"
            )
        # Keep the config the model was built with: it carries the attention implementation
        # (sdpa, eager...) that the mask must be built for.
        setattr(base, self.arch.final_norm, nn.Identity())
        if self.arch.embed_norm is not None:
            setattr(base, self.arch.embed_norm, nn.Identity())
        return base

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return getattr(base, self.arch.layers)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def view(self, start: int, end: int) -> nn.Module:
        """A base model running blocks [start, end) of this span (global indices)."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not inside this server's span [{self.start}, {self.end})")
        key = (start, end)
        if key not in self._views:
            own = self.layers(self.base)[start - self.start : end - self.start]
            shared = {id(t): t for layer in own for t in [*layer.parameters(), *layer.buffers()]}
            renumbered = nn.ModuleList()
            for new_index, layer in enumerate(own):
                clone = copy.deepcopy(layer, memo=dict(shared))
                for module in clone.modules():
                    if hasattr(module, "layer_idx"):
                        module.layer_idx = new_index
                renumbered.append(clone)
            view = copy.copy(self.base)
            view._modules = dict(self.base._modules)
            view._modules[self.arch.layers] = renumbered
            view.config = self._view_config(start, end)
            self._views[key] = view
        return self._views[key]

    def _view_config(self, start: int, end: int) -> PretrainedConfig:
        """The base model's own config (attention implementation included), cut to [start, end)."""
        config = copy.deepcopy(self.base.config)
        config.num_hidden_layers = end - start
        if getattr(self.config, "layer_types", None) is not None:
            config.layer_types = list(self.config.layer_types)[start - self.start : end - self.start]
        return config

    def new_cache(self, start: int, end: int) -> DynamicCache:
        return DynamicCache(config=self.view(start, end).config)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the whole span) on hidden states [batch, seq, hidden].

        With a cache, `attention_mask` covers past and new tokens ([batch, past + seq]) and
        the cache is extended in place; `position_ids` are [batch, seq].
        """
        view = self.view(self.start if start is None else start, self.end if end is None else end)
        kwargs: dict[str, object] = {
            "inputs_embeds": hidden.to(self.dtype),
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": cache is not None,
        }
        if self._accepts_position_ids and position_ids is not None:
            kwargs["position_ids"] = position_ids
        output = view(**kwargs)
        return output.last_hidden_state

    def measure_throughput(self, steps: int = 8, prefix: int = 16) -> float:
        """Inference tokens/s through the whole span: one-token steps after a short prefix."""
        cache = self.new_cache(self.start, self.end)
        hidden = torch.zeros(1, prefix, self.hidden_size)
        mask = torch.ones(1, prefix, dtype=torch.long)
        self.forward(hidden, mask, torch.arange(prefix)[None], cache)
        elapsed = 0.0
        for step in range(steps):
            position = prefix + step
            mask = torch.ones(1, position + 1, dtype=torch.long)
            began = time.perf_counter()
            self.forward(torch.zeros(1, 1, self.hidden_size), mask, torch.tensor([[position]]), cache)
            elapsed += time.perf_counter() - began
        return steps / max(elapsed, 1e-9)


# Buffers that the architecture computes itself and that checkpoints do not hold.
_NON_PERSISTENT_SUFFIXES = ("inv_freq", "original_inv_freq", "masked_bias", "bias_mask")
