"""Where each supported architecture keeps its pieces.

A swarm splits a causal LM into three parts: what runs before the blocks on the
client (token embeddings, plus BLOOM's embedding layer norm), the blocks that the
servers run, and what runs after them on the client (final norm and LM head).
Transformers names these differently per architecture; this table says where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one architecture's causal-LM class, relative to the model."""

    base: str  # attribute of the CausalLM holding the base model
    embed: str  # token embedding, on the base model
    layers: str  # ModuleList of blocks, on the base model
    final_norm: str  # norm after the last block, on the base model
    embed_norm: str | None = None  # norm applied to the embeddings before block 0

    def block_key(self, key: str) -> tuple[int, str] | None:
        """Split a checkpoint key into (block index, key inside the block), or None."""
        match = re.match(rf"^(?:.*\.)?{re.escape(self.layers)}\.(\d+)\.(.+)$", key)
        if match is None:
            return None
        return int(match.group(1)), match.group(2)


_LLAMA_LIKE = Architecture(base="model", embed="embed_tokens", layers="layers", final_norm="norm")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "bloom": Architecture(
        base="transformer",
        embed="word_embeddings",
        layers="h",
        final_norm="ln_f",
        embed_norm="word_embeddings_layernorm",
    ),
    "falcon": Architecture(base="transformer", embed="word_embeddings", layers="h", final_norm="ln_f"),
}


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no entry in ARCHITECTURES."""


def architecture_of(config: PretrainedConfig) -> Architecture:
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type {config.model_type!r} is not supported (supported: {supported})"
        ) from None


def kv_bytes_per_token(num_key_value_heads: int, head_dim: int, itemsize: int) -> int:
    """Attention-cache bytes one token takes in one block: keys and values, `itemsize` bytes per number."""
    return 2 * num_key_value_heads * head_dim * itemsize


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(key/value heads, head size) of one block's attention, whatever the architecture calls them.

    Llama-likes say ``num_key_value_heads``, Falcon ``num_kv_heads`` (or ``multi_query`` for one
    shared head); otherwise every attention head has its own keys and values.
    """
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    return int(kv_heads), head_dim


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing only blocks [start, end), renumbered from 0.

    Per-layer settings (``layer_types``: sliding or full attention) are sliced so
    that block ``start + i`` keeps its own setting as local layer ``i``.
    """
    num_blocks = config.num_hidden_layers
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"span [{start}, {end}) is not inside [0, {num_blocks})")
    data = config.to_dict()
    layer_types = data.get("layer_types")
    data["num_hidden_layers"] = end - start
    if layer_types is not None:
        data["layer_types"] = list(layer_types)[start:end]
    if data.get("mlp_only_layers"):
        data["mlp_only_layers"] = [i - start for i in data["mlp_only_layers"] if start <= i < end]
    return type(config).from_dict(data)
