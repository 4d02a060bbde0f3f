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
import ctypes
import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, DynamicCache, PretrainedConfig

from llmswarm_core.arch import Architecture, span_config
from llmswarm_core.source import ModelDir, load_state
from llmswarm_node.decode import DecodePath
from llmswarm_node.hugepages import pack_in_huge_pages

log = logging.getLogger(__name__)


class SpanModel:
    """Blocks [start, end) of a model, ready to run forward with or without a cache."""

    def __init__(
        self,
        source: ModelDir,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        quantization: str = "none",
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # cuDNN's attention builds a new graph for every new key length, i.e. every decode step:
            # measured on an H200 (torch 2.11, bf16), 6.8 ms of CPU per layer call against 0.1 ms of
            # GPU work. Flash and memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
        self.quantization = quantization
        self.source = source
        self.start, self.end = start, end
        self.dtype = dtype
        self.arch: Architecture = source.arch
        self.config: PretrainedConfig = span_config(source.config, start, end)
        self.hidden_size = int(source.config.hidden_size)
        self.base = self._load_base(progress)
        if quantization != "none":  # from CPU weights: bitsandbytes quantizes while moving them to the device
            quantize_linear_layers(self.layers(self.base), quantization, dtype, self.device)
        if self.device.type != "cpu":
            self.base.to(self.device)
        self.base.eval().requires_grad_(False)
        # float weights on the CPU: one huge-page mapping (hugepages.py); quantized ones keep bitsandbytes' own storage
        self._weight_pages = pack_in_huge_pages(self.base) if self.device.type == "cpu" and quantization == "none" else None
        _release_freed_memory()
        self._accepts_position_ids = "position_ids" in inspect.signature(self.base.forward).parameters
        self._views: dict[tuple[int, int], nn.Module] = {(start, end): self.base}
        self.lean_decode = True  # one-token steps through decode.py's pass where it is exact
        self._decode_paths: dict[tuple[int, int], DecodePath | None] = {}
        self.adapters: set[str] = set()

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
        with torch.no_grad():  # the one-token embedding is never used: zeros, not uninitialized memory (weights_digest)
            getattr(base, self.arch.embed).weight.zero_()
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

    def _decode_path(self, start: int, end: int) -> DecodePath | None:
        """The lean one-token pass for blocks [start, end), where it is exact (decode.py); None elsewhere."""
        key = (start, end)
        if key not in self._decode_paths:
            view = self.view(start, end)
            path = DecodePath.build(view, self.layers(view), view.config)
            if path is not None and not self._agrees_with_transformers(path, start, end):
                log.warning("blocks [%d, %d): the lean decode pass differs from transformers' forward (a transformers "
                            "version whose layers changed?); one-token steps use transformers' forward", start, end)
                path = None
            self._decode_paths[key] = path
        return self._decode_paths[key]

    @torch.inference_mode()
    def _agrees_with_transformers(self, path: DecodePath, start: int, end: int) -> bool:
        """Whether the lean pass gives bit-identical outputs and caches on random inputs, with and without padding.

        decode.py mirrors transformers' layers op for op; this catches a transformers version
        whose layers compute otherwise, before any client sees a difference.
        """
        generator = torch.Generator().manual_seed(0)
        padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
        cases = []
        for mask in (torch.ones(1, 3, dtype=torch.long), padded):
            rows = mask.shape[0]
            inputs = [torch.randn(rows, n, self.hidden_size, generator=generator) for n in (3, 1, 1)]
            cases.append((mask, [x.to(self.device, self.dtype) for x in inputs]))
        results = []
        for lean in (True, False):
            outputs, caches = [], []
            for prompt_mask, (prompt, *steps) in cases:
                cache = self.new_cache(start, end)
                mask = prompt_mask.to(self.device)
                self._run((start, end), prompt, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, None, None, lean=False)
                for hidden in steps:
                    positions = mask.sum(-1, keepdim=True)
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    if lean:
                        outputs.append(path.run(hidden, mask, positions, cache))
                    else:
                        outputs.append(self._run((start, end), hidden, mask, positions, cache, None, None, lean=False))
                caches.append(cache)
            results.append((outputs, caches))
        (lean_outputs, lean_caches), (outputs, caches) = results
        if not all(torch.equal(a, b) for a, b in zip(lean_outputs, outputs, strict=True)):
            return False
        return all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for lean_cache, cache in zip(lean_caches, caches, strict=True)
                   for a, b in zip(lean_cache.layers, cache.layers, strict=True))

    def _run(self, key: tuple[int, int], hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, cache: DynamicCache | None, prompts: torch.Tensor | None,
             adapter: str | None, lean: bool = True) -> torch.Tensor:
        if self.device.type != "cpu":
            hidden = hidden.to(self.device)
            attention_mask = None if attention_mask is None else attention_mask.to(self.device)
            position_ids = None if position_ids is None else position_ids.to(self.device)
            prompts = None if prompts is None else prompts.to(self.device)
        if (lean and self.lean_decode and cache is not None and not self.adapters
                and DecodePath.accepts(hidden, attention_mask, cache, prompts)):
            decode = self._decode_path(*key)
            if decode is not None:
                return decode.run(hidden, attention_mask, position_ids, cache)
        view = self.view(*key)
        kwargs: dict[str, object] = {
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": cache is not None,
        }
        if self._accepts_position_ids and position_ids is not None:
            kwargs["position_ids"] = position_ids
        self._activate_adapter(view, adapter)
        with _deep_prompts(self.layers(view), prompts):
            return view(**kwargs).last_hidden_state

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the whole span) on hidden states [batch, seq, hidden].

        With a cache, `attention_mask` covers past and new tokens ([batch, past + seq]) and
        the cache is extended in place; `position_ids` are [batch, seq]. `prompts`
        ([blocks, batch, prefix, hidden]) are deep prompts: block i adds prompts[i] to the
        first `prefix` positions of its input. `adapter` selects a loaded LoRA adapter.
        """
        key = (self.start if start is None else start, self.end if end is None else end)
        prompts = None if prompts is None else prompts.to(self.dtype)
        return self._run(key, hidden.to(self.dtype), attention_mask, position_ids, cache, prompts, adapter).cpu()

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        start: int,
        end: int,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the inputs (and of the deep prompts) of blocks [start, end); weights stay frozen."""
        with torch.enable_grad():
            inputs = hidden.detach().to(self.device, self.dtype).requires_grad_(True)
            deep = None if prompts is None else prompts.detach().to(self.device, self.dtype).requires_grad_(True)
            output = self._run((start, end), inputs, attention_mask, position_ids, None, deep, adapter)
            output.backward(grad_output.to(output.device, output.dtype))
        assert inputs.grad is not None
        return inputs.grad.cpu(), None if deep is None else deep.grad.cpu()

    def weights_digest(self) -> str:
        """SHA-256 over the span's parameters and buffers, in a fixed order."""
        digest = hashlib.sha256()
        for name, tensor in sorted([*self.base.named_parameters(), *self.base.named_buffers()], key=lambda kv: kv[0]):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ---- adapters ----------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter's weights for this span's blocks, selectable per request by `name`."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(path)
        config = LoraConfig.from_pretrained(str(folder))
        weights = load_file(str(folder / "adapter_model.safetensors"))
        state = {}
        for key, tensor in weights.items():
            parsed = self.arch.block_key(key)
            if parsed is not None and self.start <= parsed[0] < self.end:
                state[f"{self.arch.layers}.{parsed[0] - self.start}.{parsed[1]}"] = tensor.to(self.dtype)
        if len(self._views) > 1:
            raise RuntimeError("load adapters before serving sub-spans")
        inject_adapter_in_model(config, self.base, adapter_name=name)
        result = set_peft_model_state_dict(self.base, state, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{name}." in k]
        if missing:
            raise ValueError(f"adapter {name!r} lacks weights for {missing[:4]}...")
        self.base.requires_grad_(False)
        self.adapters.add(name)

    def _activate_adapter(self, view: nn.Module, adapter: str | None) -> None:
        if not self.adapters:
            return
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter!r} (this server has {sorted(self.adapters)})")
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in view.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(adapter is not None)
                if adapter is not None:
                    module.set_adapter(adapter)

    def measure_throughput(self, steps: int = 8, prefix: int = 16) -> float:
        """Inference tokens/s through the whole span: one-token steps after a short prefix."""
        cache = self.new_cache(self.start, self.end)
        hidden = torch.zeros(1, prefix, self.hidden_size)
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        mask = torch.ones(1, prefix, dtype=torch.long)
        self.forward(hidden, mask, torch.arange(prefix)[None], cache)
        elapsed = 0.0
        for step in range(steps):
            position = prefix + step
            mask = torch.ones(1, position + 1, dtype=torch.long)
            began = time.perf_counter()
            self.forward(torch.zeros(1, 1, self.hidden_size), mask, torch.tensor([[position]]), cache)
            synchronize()
            elapsed += time.perf_counter() - began
        return steps / max(elapsed, 1e-9)


QUANTIZATIONS = ("none", "int8", "nf4")


def _release_freed_memory() -> None:
    """Hand memory freed while loading (full-precision copies of quantized weights) back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def quantize_linear_layers(module: nn.Module, quantization: str, compute_dtype: torch.dtype,
                           device: torch.device | None = None) -> int:
    """Replace every nn.Linear inside `module` with its bitsandbytes int8 or nf4 version (in place).

    The same code runs on CUDA and, with bitsandbytes >= 0.45, on the CPU. Returns how many
    layers were replaced. Other weights (norms, fused MoE experts) stay as they are.
    """
    import bitsandbytes as bnb

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


@contextmanager
def _deep_prompts(layers: nn.ModuleList, prompts: torch.Tensor | None) -> Iterator[None]:
    """While active, block i adds prompts[i] ([batch, prefix, hidden]) to the first positions of its input."""
    if prompts is None:
        yield
        return

    def adder(prompt: torch.Tensor) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            hidden = args[0] if args else kwargs["hidden_states"]
            prefix = prompt.shape[1]
            hidden = torch.cat([hidden[:, :prefix] + prompt.to(hidden.dtype), hidden[:, prefix:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [layer.register_forward_pre_hook(adder(prompts[i]), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# Buffers that the architecture computes itself and that checkpoints do not hold.
_NON_PERSISTENT_SUFFIXES = ("inv_freq", "original_inv_freq", "masked_bias", "bias_mask")
