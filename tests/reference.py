"""Local references for exact-match tests: blocks [start, end) of a transformers model, run by transformers itself.

A remote span is compared with the same blocks run here, in this process, with their own attention cache
(Petals' tests/test_block_exact_match.py). Nothing here imports the product's server or client code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel


class LocalSpan:
    """Blocks [start, end) of a Llama-like causal LM as a base model of their own, with one session's cache.

    Built from copies of the blocks (renumbered from 0, as a span's own model numbers them), so the
    model it was cut from is left as it was.
    """

    def __init__(self, local: PreTrainedModel, start: int, end: int) -> None:
        config = copy.deepcopy(local.config)
        config.num_hidden_layers = end - start
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[start:end]
        config.vocab_size = 1  # this model never embeds tokens
        config.pad_token_id = None
        base_model = local.base_model
        self.base = type(base_model)(config).eval()
        layers = nn.ModuleList(copy.deepcopy(list(base_model.layers[start:end])))
        for index, layer in enumerate(layers):
            layer.self_attn.layer_idx = index
        self.base.layers = layers
        self.base.norm = nn.Identity()
        self.base.requires_grad_(False)
        self.config = config
        self.cache = DynamicCache(config=config)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the blocks on the next positions of this session (the cache grows)."""
        with torch.no_grad():
            return self.base(inputs_embeds=hidden, cache=self.cache, use_cache=True).last_hidden_state

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the blocks on a fresh sequence, without touching the session's cache."""
        with torch.no_grad():
            return self.base(inputs_embeds=hidden, use_cache=False).last_hidden_state
