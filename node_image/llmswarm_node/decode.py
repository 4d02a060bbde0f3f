"""A lean pass for one-token decode steps through Llama-family blocks (Llama, Mistral, Qwen2).

A decode step through a block is seven matrix-vector products and a few dozen small
ops. Run by transformers' model forward, it also pays for the model-level work (a mask
built and then found unnecessary, rotary tables, output capturing) and for each module
call and decorator on the way down: on the 2-core CI machine, 10 SmolLM2 blocks take
10.6-11.6 ms that way against 9.4-10.2 ms here, where the linear layers alone take
8.5-8.9 ms (bench/decode_pass.py).

This pass runs the same torch ops, in the same order and with the same arguments, as
transformers' ``LlamaDecoderLayer`` with sdpa attention does for such a step, so its
outputs and the cache it extends are bit-identical (tests/test_decode_path.py checks
both, for every architecture it accepts; the span runner checks it again when it builds the
pass (decode_check.py), and keeps transformers' forward if a transformers version computes otherwise).
It is used only when all of this holds:

- every block is a Llama, Mistral or Qwen2 decoder layer with plain ``nn.Linear``
  projections (no quantization, no LoRA), SiLU, sdpa attention and no sliding window;
- the step is one new token per row, on a cache of plain dynamic layers, without deep
  prompts, with a mask (if any) that covers the cache and the new token, and that lets
  every new token see itself.

Padding is handled the way transformers handles it: a boolean mask [batch, 1, 1, keys]
and, for grouped-query attention, the query heads packed per key/value head.

Anything else runs through transformers' own forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.activations import SiLUActivation
from transformers.cache_utils import DynamicLayer

_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


@dataclass(frozen=True)
class _Block:
    """One decoder layer's weights and sizes, gathered once."""

    input_norm: torch.Tensor
    input_eps: float
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    post_norm: torch.Tensor
    post_eps: float
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    head_dim: int
    scaling: float
    groups: int  # query heads per key/value head


class DecodePath:
    """Runs one-token steps through a base model's blocks; `build` says whether it can."""

    def __init__(self, rotary: nn.Module, blocks: list[_Block]) -> None:
        self.rotary = rotary
        self.blocks = blocks

    @classmethod
    def build(cls, base: nn.Module, layers: nn.ModuleList, config: PretrainedConfig) -> DecodePath | None:
        """The decode path for these blocks, or None where it would not be exact."""
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None or getattr(config, "_attn_implementation", None) != "sdpa":
            return None
        blocks = []
        for layer in layers:
            block = _gather(layer)
            if block is None:
                return None
            blocks.append(block)
        return cls(rotary, blocks)

    @staticmethod
    def accepts(hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: DynamicCache | None,
                prompts: torch.Tensor | None) -> bool:
        """Whether a step is one this path runs exactly: one token per row, no deep prompts, a plain cache, and
        a mask (if any) that covers the cache and the new token and lets each new token see itself."""
        if cache is None or prompts is not None or hidden.dim() != 3 or hidden.shape[1] != 1:
            return False
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return False
        if attention_mask is None:
            return True
        return attention_mask.shape == (hidden.shape[0], cache.get_seq_length() + 1) and bool(attention_mask[:, -1].all())

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
            cache: DynamicCache) -> torch.Tensor:
        """Blocks' output for hidden [batch, 1, hidden]; extends `cache` by one position."""
        batch = hidden.shape[0]
        mask = None  # no padding: no mask, as transformers skips it
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.to(device=hidden.device, dtype=torch.bool)[:, None, None, :]
        if position_ids is None:
            past = cache.get_seq_length()
            position_ids = torch.arange(past, past + 1, device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, block in enumerate(self.blocks):
            residual = hidden
            x = _rms_norm(hidden, block.input_norm, block.input_eps)
            q = F.linear(x, *block.q).view(batch, 1, -1, block.head_dim).transpose(1, 2)
            k = F.linear(x, *block.k).view(batch, 1, -1, block.head_dim).transpose(1, 2)
            v = F.linear(x, *block.v).view(batch, 1, -1, block.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = cache.update(k, v, index)
            attended = _attend(q, k, v, mask, block)
            attended = attended.reshape(batch, -1, 1, block.head_dim).transpose(1, 2).contiguous()
            attended = attended.reshape(batch, 1, -1).contiguous()
            hidden = residual + F.linear(attended, *block.o)
            residual = hidden
            x = _rms_norm(hidden, block.post_norm, block.post_eps)
            x = F.linear(F.silu(F.linear(x, *block.gate)) * F.linear(x, *block.up), *block.down)
            hidden = residual + x
        return hidden


def _gather(layer: nn.Module) -> _Block | None:
    if type(layer).__name__ not in _LAYERS:
        return None
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(type(norm).__name__ not in _NORMS for norm in norms):
        return None
    if type(mlp.act_fn) not in (SiLUActivation, nn.SiLU):
        return None
    # Qwen2 sets a window per layer (None for full attention); Mistral reads its config's
    if getattr(attention, "sliding_window", getattr(attention.config, "sliding_window", None)) is not None:
        return None
    linears = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
               mlp.down_proj]
    if any(type(linear) is not nn.Linear for linear in linears):
        return None
    q, k, v, o, gate, up, down = ((linear.weight, linear.bias) for linear in linears)
    return _Block(
        input_norm=norms[0].weight, input_eps=norms[0].variance_epsilon, q=q, k=k, v=v, o=o,
        post_norm=norms[1].weight, post_eps=norms[1].variance_epsilon, gate=gate, up=up, down=down,
        head_dim=attention.head_dim, scaling=attention.scaling, groups=attention.num_key_value_groups,
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, block: _Block) -> torch.Tensor:
    """transformers' sdpa_attention_forward for one query token on the CPU or CUDA: grouped heads via
    enable_gqa where it takes that way (no mask, head size <= 256), else packed per key/value head."""
    if block.groups > 1 and ((mask is None and block.head_dim <= 256) or os.environ.get(_FORCE_GQA, "0") == "1"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=block.scaling,
                                              is_causal=False, enable_gqa=True)
    if block.groups > 1:
        q = q.reshape(q.shape[0], q.shape[1] // block.groups, block.groups, q.shape[3])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=block.scaling, is_causal=False)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers then always passes enable_gqa


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward, op for op."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
