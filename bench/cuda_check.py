"""CUDA paths of the block server: bf16, float16 and bitsandbytes int8/nf4 spans on a GPU.

Builds a random Llama-style model (no download), loads its blocks as a server would, and
prints one JSON object: GPU memory per block, error against the float32 GPU span (the
baseline, same run), decode tokens/s through the span for 1 and 16 batched sessions, and
whether backward (training through the swarm) works. Needs a CUDA GPU.

    python bench/cuda_check.py
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmswarm_core.source import ModelDir
from llmswarm_node.batching import StepInput, run_steps
from llmswarm_node.span import SpanModel

SETTINGS = [("float32", "none"), ("bfloat16", "none"), ("float16", "none"), ("float16", "int8"), ("bfloat16", "nf4"),
            ("float32", "nf4")]


def main() -> None:
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                         num_key_value_heads=4, num_hidden_layers=8, rope_theta=10000.0)
    folder = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    source = ModelDir(folder)
    hidden = torch.randn(2, 64, config.hidden_size) * 0.5
    results, reference = {}, None
    for dtype, quantization in SETTINGS:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        span = SpanModel(source, 0, 8, dtype=getattr(torch, dtype), progress=False, quantization=quantization, device="cuda")
        per_block = (torch.cuda.memory_allocated() - before) / 8
        output = span.forward(hidden).float()
        if reference is None:
            reference = output
        error = ((output - reference).norm() / reference.norm()).item()
        speed = {}
        for sessions in (1, 16):
            caches = [span.new_cache(0, 8) for _ in range(sessions)]
            for cache in caches:
                span.forward(torch.randn(1, 32, config.hidden_size), None, None, cache)
            steps = 20
            for step in range(3):  # warm up kernels and allocator
                run_steps(span, 0, 8, [StepInput(c, 32 + step, torch.randn(1, 1, config.hidden_size), None, None) for c in caches])
            torch.cuda.synchronize()
            began = time.perf_counter()
            for step in range(steps):
                run_steps(span, 0, 8, [StepInput(c, 35 + step, torch.randn(1, 1, config.hidden_size), None, None) for c in caches])
            torch.cuda.synchronize()
            speed[str(sessions)] = round(sessions * steps / (time.perf_counter() - began), 1)
        try:
            grad, _ = span.backward(hidden[:1], torch.ones(1, 64, config.hidden_size), None, None, 0, 8)
            backward = bool(torch.isfinite(grad).all()) and grad.abs().sum().item() > 0
        except Exception as error_:  # noqa: BLE001 - reported in the JSON
            backward = f"{type(error_).__name__}: {error_}"[:200]
        results[f"{dtype}/{quantization}"] = {
            "gpu_mib_per_block": round(per_block / 2**20, 1),
            "relative_error_vs_float32": round(error, 5),
            "decode_tok_s": speed,
            "backward_ok": backward,
        }
        del span
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "model": "random Llama, hidden 2048, 8 blocks", "results": results}, indent=1))


if __name__ == "__main__":
    main()
