"""Loading a span of transformer blocks: read only its weights, quantize, pack, add adapters.

The span is the architecture's base model (``LlamaModel``, ``BloomModel``...) built for
the span's blocks only, with its embeddings shrunk to nothing and its final norm (and
BLOOM's embedding norm) replaced by identities: its ``forward(inputs_embeds=...)`` then
runs exactly the blocks [start, end) with transformers' own masks, rotary embeddings,
ALiBi and KV cache. Only the span's weights are read from disk.

What comes out is a :class:`LoadedSpan`: frozen weights on their device, ready for
span.py's runner. Adapters are loaded into it before a runner serves it.
"""

from __future__ import annotations

import copy
import ctypes
import mmap
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, PretrainedConfig

from llmswarm_core.arch import Architecture, span_config
from llmswarm_core.source import ModelDir, load_state
from llmswarm_node.hugepages import pack_in_huge_pages

QUANTIZATIONS = ("none", "int8", "nf4")

# Buffers that the architecture computes itself and that checkpoints do not hold.
_NON_PERSISTENT_SUFFIXES = ("inv_freq", "original_inv_freq", "masked_bias", "bias_mask")


@dataclass
class LoadedSpan:
    """Blocks [start, end) of a model as a frozen base model on its device."""

    source: ModelDir
    start: int
    end: int
    dtype: torch.dtype
    device: torch.device
    quantization: str
    config: PretrainedConfig  # the model's config cut to the span (span_config)
    base: nn.Module
    weight_pages: mmap.mmap | None = None  # the huge-page mapping the weights live in (kept alive with them)
    adapters: set[str] = field(default_factory=set)

    @property
    def arch(self) -> Architecture:
        return self.source.arch

    @property
    def hidden_size(self) -> int:
        return int(self.source.config.hidden_size)

    def layers(self, base: nn.Module | None = None) -> nn.ModuleList:
        """The block list of `base` (default: the span's own base model)."""
        return getattr(self.base if base is None else base, self.arch.layers)


def load_span(source: ModelDir, start: int, end: int, dtype: torch.dtype = torch.float32, progress: bool = True,
              quantization: str = "none", device: str | torch.device = "cpu") -> LoadedSpan:
    """Read blocks [start, end) of `source`, quantize them (int8, nf4) and put them on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        # cuDNN's attention builds a new graph for every new key length, i.e. every decode step:
        # measured on an H200 (torch 2.11, bf16), 6.8 ms of CPU per layer call against 0.1 ms of
        # GPU work. Flash and memory-efficient attention have no such cost.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    config = span_config(source.config, start, end)
    base = _read_base(source, config, start, end, dtype, progress)
    loaded = LoadedSpan(source, start, end, dtype, device, quantization, config, base)
    if quantization != "none":  # from CPU weights: bitsandbytes quantizes while moving them to the device
        # Block by block, and each block's remaining weights (norms) copied out of the block file: the tensors
        # read from safetensors are views of a mapping of the whole file, and one surviving 2 KiB norm kept all
        # 13.5 MiB of its block file resident (405 MiB for 30 SmolLM2 blocks, more than the float32 weights'
        # own quantized size). Trimming after each block keeps the peak near the final size.
        for layer in loaded.layers():
            quantize_linear_layers(layer, quantization, dtype, device)
            _own_storage(layer)
            release_freed_memory()
    if device.type != "cpu":
        base.to(device)
    base.eval().requires_grad_(False)
    # float weights on the CPU: one huge-page mapping (hugepages.py); quantized ones keep bitsandbytes' own storage
    if device.type == "cpu" and quantization == "none":
        loaded.weight_pages = pack_in_huge_pages(base)
    release_freed_memory()
    return loaded


def _read_base(source: ModelDir, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype,
               progress: bool) -> nn.Module:
    """Read only the span's blocks and load them with transformers' own loader."""
    arch = source.arch
    state: dict[str, torch.Tensor] = {}
    for block in tqdm(range(start, end), desc=f"reading blocks {start}:{end}", unit="block", disable=not progress):
        for key, tensor in source.block_state(block, dtype=dtype).items():
            state[f"{arch.layers}.{block - start}.{key}"] = tensor
    shell_config = copy.deepcopy(config)
    shell_config.vocab_size = 1  # the server never embeds tokens
    shell_config.pad_token_id = None
    model_class = AutoModel._model_mapping[type(shell_config)]
    base, info = load_state(model_class, shell_config, state, dtype)
    del state
    block_prefix = f"{arch.layers}."
    missing = sorted(k for k in info["missing_keys"] if k.startswith(block_prefix) and not k.endswith(_NON_PERSISTENT_SUFFIXES))
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"blocks [{start}, {end}) do not match the architecture: missing {missing}, "
            f"unexpected {sorted(info['unexpected_keys'])}, mismatched {sorted(info['mismatched_keys'])}"
        )
    # Keep the config the model was built with: it carries the attention implementation
    # (sdpa, eager...) that the mask must be built for.
    setattr(base, arch.final_norm, nn.Identity())
    with torch.no_grad():  # the one-token embedding is never used: zeros, not uninitialized memory (weights_digest)
        getattr(base, arch.embed).weight.zero_()
    if arch.embed_norm is not None:
        setattr(base, arch.embed_norm, nn.Identity())
    return base


HUB_PREFIX = "hub:"  # an adapter SPEC "hub:ORG/NAME[@REVISION]": a Hugging Face Hub repository
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def adapter_folder(spec: str | Path) -> Path:
    """The local folder of an adapter SPEC: a directory as given, or a Hub repository's two adapter files, fetched
    into the Hugging Face cache (``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads only what the cache holds)."""
    text = str(spec)
    if not text.startswith(HUB_PREFIX):
        return Path(text)
    from huggingface_hub import snapshot_download

    repo, _, revision = text[len(HUB_PREFIX):].partition("@")
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=ADAPTER_FILES))
    except Exception as error:  # the hub client's errors (offline, unknown repository, no access) have many types
        raise ValueError(f"adapter repository {repo} cannot be read from the Hugging Face Hub or its cache: {error}") from error


def load_adapter(span: LoadedSpan, name: str, path: str | Path) -> None:
    """Load a PEFT LoRA adapter's weights for the span's blocks, selectable per request by `name`; `path` is a
    directory or ``hub:ORG/NAME[@REVISION]`` (adapter_folder).

    Load adapters before a runner serves the span: its sub-span views copy the blocks as they are then.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = adapter_folder(path)
    config = LoraConfig.from_pretrained(str(folder))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    state = {}
    for key, tensor in weights.items():
        parsed = span.arch.block_key(key)
        if parsed is not None and span.start <= parsed[0] < span.end:
            state[f"{span.arch.layers}.{parsed[0] - span.start}.{parsed[1]}"] = tensor.to(span.dtype)
    inject_adapter_in_model(config, span.base, adapter_name=name)
    result = set_peft_model_state_dict(span.base, state, adapter_name=name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{name}." in k]
    if missing:
        raise ValueError(f"adapter {name!r} lacks weights for {missing[:4]}...")
    span.base.requires_grad_(False)
    span.adapters.add(name)


def quantize_linear_layers(module: nn.Module, quantization: str, compute_dtype: torch.dtype,
                           device: torch.device | None = None) -> int:
    """Replace every nn.Linear inside `module` with its bitsandbytes int8 or nf4 version (in place).

    The same code runs on CUDA and, with bitsandbytes >= 0.45, on the CPU. Returns how many
    layers were replaced. Other weights (norms, fused MoE experts) stay as they are.
    """
    bnb = _import_bitsandbytes()
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight.data.to(torch.float32 if compute_dtype == torch.float32 else torch.float16)
            if quantization == "int8":
                new: nn.Module = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                    has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        quant_type="nf4", compute_dtype=compute_dtype)
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, new.to(device or child.weight.device))  # moving to the device quantizes the weights
            replaced += 1
    return replaced


def _import_bitsandbytes():
    """bitsandbytes, imported with torch.compile switched off.

    At import, bitsandbytes wraps a few fallback kernels in torch.compile, and that call alone imports
    torch._inductor, networkx and more: 43 MiB of a CPU server's resident memory (measured), for fallback
    kernels (odd shapes) that then run eagerly, as they do wherever compiling fails.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda fn: fn)
    try:
        import bitsandbytes
    finally:
        torch.compile = compile_
    return bitsandbytes


def _own_storage(module: nn.Module) -> None:
    """Give `module`'s plain parameters and buffers their own memory (quantized ones already have it)."""
    bnb = _import_bitsandbytes()
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and not isinstance(param, (bnb.nn.Int8Params, bnb.nn.Params4bit)):
                param.data = param.data.clone()
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.clone()


def release_freed_memory() -> None:
    """Hand memory freed while loading (full-precision copies of quantized weights) back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
