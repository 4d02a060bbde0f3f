"""Shapes of known models, so the operator can plan without downloading anything.

The operator never loads a model: it needs only the number of blocks, the hidden size
and what one block costs in memory. Models in :data:`CATALOG` are known by their
``source`` (the SPEC that ``llmswarm serve --model`` takes); any other model gives its
shape in ``spec.model.architecture``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmswarm_control.placement import llama_block_params


@dataclass(frozen=True)
class ModelShape:
    name: str  # the name block servers announce (the route map's model name)
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    params_per_block: int


def llama_shape(
    name: str,
    num_blocks: int,
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    params_per_block: int | None = None,
) -> ModelShape:
    kv_heads = num_key_value_heads or num_attention_heads
    head = head_dim or hidden_size // num_attention_heads
    params = params_per_block or llama_block_params(hidden_size, intermediate_size, num_attention_heads, kv_heads, head)
    return ModelShape(name, num_blocks, hidden_size, intermediate_size, num_attention_heads, kv_heads, head, params)


_SMOLLM2 = llama_shape("SmolLM2-135M-Instruct", 30, 576, 1536, 9, 3)
_LLAMA2_7B = (32, 4096, 11008, 32, 32)
_LLAMA2_13B = (40, 5120, 13824, 40, 40)
_LLAMA2_70B = (80, 8192, 28672, 64, 8)
_LLAMA3_8B = (32, 4096, 14336, 32, 8)
_LLAMA3_70B = (80, 8192, 28672, 64, 8)
_LLAMA31_405B = (126, 16384, 53248, 128, 8)
_MISTRAL_7B = (32, 4096, 14336, 32, 8)
_QWEN25_72B = (80, 8192, 29568, 64, 8)


def _hub(repo: str, dims: tuple[int, int, int, int, int]) -> tuple[str, ModelShape]:
    return repo, llama_shape(repo, *dims)


CATALOG: dict[str, ModelShape] = dict([
    ("smollm2", _SMOLLM2),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", llama_shape("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 1536, 9, 3)),
    _hub("meta-llama/Llama-2-7b-hf", _LLAMA2_7B),
    _hub("meta-llama/Llama-2-7b-chat-hf", _LLAMA2_7B),
    _hub("meta-llama/Llama-2-13b-hf", _LLAMA2_13B),
    _hub("meta-llama/Llama-2-13b-chat-hf", _LLAMA2_13B),
    _hub("meta-llama/Llama-2-70b-hf", _LLAMA2_70B),
    _hub("meta-llama/Llama-2-70b-chat-hf", _LLAMA2_70B),
    _hub("meta-llama/Meta-Llama-3-8B", _LLAMA3_8B),
    _hub("meta-llama/Meta-Llama-3-8B-Instruct", _LLAMA3_8B),
    _hub("meta-llama/Llama-3.1-8B-Instruct", _LLAMA3_8B),
    _hub("meta-llama/Meta-Llama-3-70B", _LLAMA3_70B),
    _hub("meta-llama/Meta-Llama-3-70B-Instruct", _LLAMA3_70B),
    _hub("meta-llama/Llama-3.1-70B-Instruct", _LLAMA3_70B),
    _hub("meta-llama/Llama-3.3-70B-Instruct", _LLAMA3_70B),
    _hub("meta-llama/Llama-3.1-405B-Instruct", _LLAMA31_405B),
    _hub("mistralai/Mistral-7B-Instruct-v0.2", _MISTRAL_7B),
    _hub("Qwen/Qwen2.5-72B-Instruct", _QWEN25_72B),
])
