"""Bytes per block, server memory, decode speed and output quality for quantization none / int8 / nf4.

For each setting: the bytes one block's weights take in memory, the resident memory (RSS,
and PSS) of a real `llmswarm serve` process holding all 30 blocks, the decode speed of the
30 blocks (one-token steps on one thread, as a server runs them, after a 32-token prompt),
and quality against float32 (the baseline, measured in the same run): top-1 token agreement
and mean absolute logit error over a fixed text, with the quantized blocks and the float32
embeddings and LM head. ``rss_vs_float32`` is the ratio of whole processes: it includes the
~360 MiB a server holds before any weight (bench/memory.py splits it by import).

    python bench/quantization.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from memory import serve_and_measure

from llmswarm_core.source import resolve
from llmswarm_node.span import SpanModel

TEXT = ("The history of astronomy is long. Ancient people watched the sky and tracked the moon, the sun and the "
        "planets. Later, telescopes showed moons around Jupiter and rings around Saturn, and physics explained why "
        "planets move in ellipses. Today, satellites measure the light of distant galaxies.")


def block_bytes(span: SpanModel) -> float:
    tensors = [*span.layers(span.base).parameters(), *span.layers(span.base).buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / span.num_blocks


def decode_tok_s(span: SpanModel, steps: int = 32) -> float:
    """One-token steps through every block of `span` on one thread, after a 32-token prompt (median step)."""
    torch.manual_seed(0)
    hidden = span.config.hidden_size
    cache = span.new_cache(0, span.num_blocks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            span.forward(torch.randn(1, 32, hidden), None, None, cache)
            times = []
            for position in range(32, 32 + steps):
                began = time.perf_counter()
                span.forward(torch.randn(1, 1, hidden), None, torch.tensor([[position]]), cache)
                times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return 1.0 / statistics.median(times)


def main() -> None:
    source = resolve("smollm2", progress=False)
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = source.tokenizer()(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = local(ids).logits[0]
    results = {}
    for quantization in ("none", "int8", "nf4"):
        span = SpanModel(source, 0, source.num_blocks, progress=False, quantization=quantization)
        with torch.no_grad():
            hidden = span.forward(local.model.embed_tokens(ids))
            logits = local.lm_head(local.model.norm(hidden))[0]
        server = serve_and_measure("smollm2", 0, source.num_blocks, "float32", ("--quantization", quantization))
        results[quantization] = {
            "bytes_per_block": int(block_bytes(span)),
            "server_rss_mib_30_blocks": server["rss_mib"],
            "server_pss_mib_30_blocks": server["pss_mib"],
            "decode_tok_s_30_blocks": round(decode_tok_s(span), 1),
            "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
            "mean_abs_logit_error": round(float((logits - reference).abs().mean()), 4),
        }
        del span
    none = results["none"]
    for values in results.values():
        values["bytes_vs_float32"] = round(values["bytes_per_block"] / none["bytes_per_block"], 3)
        values["rss_vs_float32"] = round(values["server_rss_mib_30_blocks"] / none["server_rss_mib_30_blocks"], 3)
        values["decode_vs_float32"] = round(values["decode_tok_s_30_blocks"] / none["decode_tok_s_30_blocks"], 3)
    print(json.dumps({"model": source.name, "tokens": int(ids.shape[1]), "baseline": "float32 transformers",
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
