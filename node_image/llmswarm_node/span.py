"""Running a loaded span (span_loader.py) with the architecture's own code.

:class:`SpanRunner` runs blocks [a, b) of a :class:`LoadedSpan` on hidden states, with or
without a session's attention cache: through a view for a sub-range (span_views.py), with
a LoRA adapter or deep prompts where a request asks for them, and for one-token decode
steps through decode.py's lean pass where that pass is exact (checked once per view by
decode_check.py). It also runs backward, hashes the weights and measures throughput.
:class:`SpanModel` loads and runs in one go.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from llmswarm_core.arch import Architecture, kv_shape
from llmswarm_core.source import ModelDir
from llmswarm_node.decode import DecodePath
from llmswarm_node.decode_check import agrees_with_transformers
from llmswarm_node.lora import ClientLora, LoraRows, applied, blocks_of
from llmswarm_node.memory import BlockShape
from llmswarm_node.span_loader import LoadedSpan, load_span
from llmswarm_node.span_views import SpanViews

log = logging.getLogger(__name__)

DIGEST_CHUNK = 64 * 1024 * 1024  # bytes of a weight copied off the device at once to be hashed


class SpanRunner:
    """Blocks [start, end) of a loaded span, run forward (with or without a cache) and backward."""

    def __init__(self, loaded: LoadedSpan) -> None:
        self.loaded = loaded
        self.source: ModelDir = loaded.source
        self.start, self.end = loaded.start, loaded.end
        self.dtype, self.device, self.quantization = loaded.dtype, loaded.device, loaded.quantization
        self.arch: Architecture = loaded.arch
        self.config: PretrainedConfig = loaded.config
        self.hidden_size = loaded.hidden_size
        self.base: nn.Module = loaded.base
        self.adapters: set[str] = loaded.adapters  # the loaded span's own set
        self.views = SpanViews(loaded)
        self._accepts_position_ids = "position_ids" in inspect.signature(loaded.base.forward).parameters
        self.lean_decode = True  # one-token steps through decode.py's pass where it is exact
        self._decode_paths: dict[tuple[int, int], DecodePath | None] = {}
        self._digest: tuple[tuple[tuple[str, int, int], ...], str] | None = None  # (weights version, digest)
        self.digests_computed = 0
        kv_heads, head_dim = kv_shape(loaded.config)
        # What one pass's memory is estimated from (memory.py), with the attention the blocks were built with.
        self.block_shape = BlockShape.of(loaded.base.config, kv_heads, head_dim, self.dtype.itemsize,
                                         quantized=self.quantization != "none")

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return self.loaded.layers(base)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    # ---- views, caches and the decode pass ---------------------------------------------------------------
    def view(self, start: int, end: int) -> nn.Module:
        """A base model running blocks [start, end) of this span (global indices)."""
        return self.views.view(start, end)

    def new_cache(self, start: int, end: int) -> DynamicCache:
        return self.views.new_cache(start, end)

    def decode_path(self, start: int, end: int) -> DecodePath | None:
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

    def _agrees_with_transformers(self, path: DecodePath, start: int, end: int) -> bool:
        def reference(hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
            return self._run((start, end), hidden, mask, positions, cache, None, None, lean=False)

        return agrees_with_transformers(path, reference, lambda: self.new_cache(start, end), self.hidden_size,
                                        self.device, self.dtype)

    # ---- running -----------------------------------------------------------------------------------------
    def _run(self, key: tuple[int, int], hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, cache: DynamicCache | None, prompts: torch.Tensor | None,
             adapter: str | None, lean: bool = True, lora: LoraRows | None = None) -> torch.Tensor:
        if self.device.type != "cpu":
            hidden = hidden.to(self.device)
            attention_mask = None if attention_mask is None else attention_mask.to(self.device)
            position_ids = None if position_ids is None else position_ids.to(self.device)
            prompts = None if prompts is None else prompts.to(self.device)
        if (lean and self.lean_decode and cache is not None and not self.adapters and lora is None
                and DecodePath.accepts(hidden, attention_mask, cache, prompts)):
            decode = self.decode_path(*key)
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
        with _deep_prompts(self.layers(view), prompts), applied(self.layers(view), lora):
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
        lora: LoraRows | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the whole span) on hidden states [batch, seq, hidden].

        With a cache, `attention_mask` covers past and new tokens ([batch, past + seq]) and
        the cache is extended in place; `position_ids` are [batch, seq]. `prompts`
        ([blocks, batch, prefix, hidden]) are deep prompts: block i adds prompts[i] to the
        first `prefix` positions of its input. `adapter` selects a loaded LoRA adapter; `lora` gives
        rows their clients' own LoRA weights (lora.py).
        """
        key = (self.start if start is None else start, self.end if end is None else end)
        prompts = None if prompts is None else prompts.to(self.dtype)
        return self._run(key, hidden.to(self.dtype), attention_mask, position_ids, cache, prompts, adapter,
                         lora=lora).cpu()

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
        per_block: bool = False,
        lora: ClientLora | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of the inputs (and of the deep prompts) of blocks [start, end); weights stay frozen.

        `per_block` keeps only each block's input from a forward without autograd, then runs the blocks
        backwards one at a time, each forward again with autograd: the memory of one block's activations
        instead of every block's (memory.py), for a second forward's time. With a client's `lora` weights,
        their gradient is left in ``lora.grad`` (lora.py).
        """
        trainable = None if lora is None else lora.trainable()
        grads = self._backward(hidden, grad_output, attention_mask, position_ids, start, end, prompts, adapter,
                               per_block, trainable)
        if lora is not None and trainable is not None:
            grad = trainable.weights.grad
            lora.grad = torch.zeros_like(lora.weights) if grad is None else grad
        return grads

    def _backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, start: int, end: int, prompts: torch.Tensor | None,
                  adapter: str | None, per_block: bool, lora: ClientLora | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if per_block:
            return self._backward_per_block(hidden, grad_output, attention_mask, position_ids, start, end, prompts,
                                            adapter, lora)
        with torch.enable_grad():
            inputs = hidden.detach().to(self.device, self.dtype).requires_grad_(True)
            deep = None if prompts is None else prompts.detach().to(self.device, self.dtype).requires_grad_(True)
            output = self._run((start, end), inputs, attention_mask, position_ids, None, deep, adapter,
                               lora=LoraRows.uniform(lora, inputs.shape[0]))
            output.backward(grad_output.to(output.device, output.dtype))
        assert inputs.grad is not None
        return inputs.grad.cpu(), None if deep is None else deep.grad.cpu()

    def _backward_per_block(self, hidden: torch.Tensor, grad_output: torch.Tensor, attention_mask: torch.Tensor | None,
                            position_ids: torch.Tensor | None, start: int, end: int, prompts: torch.Tensor | None,
                            adapter: str | None, lora: ClientLora | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = LoraRows.uniform(lora, hidden.shape[0])
        deep = None if prompts is None else prompts.detach().to(self.device, self.dtype)
        block_inputs = [hidden.detach().to(self.device, self.dtype)]
        with torch.no_grad():
            for index, block in enumerate(range(start, end - 1)):
                block_prompts = None if deep is None else deep[index:index + 1]
                block_inputs.append(self._run((block, block + 1), block_inputs[-1], attention_mask, position_ids, None,
                                              block_prompts, adapter, lora=blocks_of(rows, index, index + 1)))
        grad = grad_output
        prompt_grads: list[torch.Tensor] = []
        for index in reversed(range(end - start)):
            with torch.enable_grad():
                inputs = block_inputs.pop().requires_grad_(True)
                block_prompts = None if deep is None else deep[index:index + 1].clone().requires_grad_(True)
                output = self._run((start + index, start + index + 1), inputs, attention_mask, position_ids, None,
                                   block_prompts, adapter, lora=blocks_of(rows, index, index + 1))
                output.backward(grad.to(output.device, output.dtype))
            assert inputs.grad is not None
            grad = inputs.grad
            if block_prompts is not None:
                assert block_prompts.grad is not None
                prompt_grads.append(block_prompts.grad)
        return grad.cpu(), torch.cat(prompt_grads[::-1]).cpu() if prompt_grads else None

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

    # ---- about the span ----------------------------------------------------------------------------------
    def weights_digest(self) -> str:
        """SHA-256 over the span's parameters and buffers, in a fixed order; computed again only when the weights
        changed since (another tensor, or one written in place: torch counts each tensor's in-place writes)."""
        tensors = sorted([*self.base.named_parameters(), *self.base.named_buffers()], key=lambda kv: kv[0])
        version = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in tensors)
        if self._digest is not None and self._digest[0] == version:
            return self._digest[1]
        digest = hashlib.sha256()
        for name, tensor in tensors:
            digest.update(name.encode())
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            for begin in range(0, flat.numel(), DIGEST_CHUNK):  # off the device a chunk at a time
                digest.update(flat[begin:begin + DIGEST_CHUNK].cpu().numpy())
        self._digest = (version, digest.hexdigest())
        self.digests_computed += 1
        return self._digest[1]

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


class SpanModel(SpanRunner):
    """Blocks [start, end) of a model, loaded (span_loader.py) and ready to run."""

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
        super().__init__(load_span(source, start, end, dtype, progress, quantization, device))


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
