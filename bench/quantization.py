"""Bytes per block, server memory and output quality for quantization none / int8 / nf4.

For each setting: the bytes one block's weights take in memory, the resident memory of a
real `llmswarm serve` process holding all 30 blocks, and quality against float32 (the
baseline, measured in the same run): top-1 token agreement and mean absolute logit error
over a fixed text, with the quantized blocks and the float32 embeddings and LM head.

    python bench/quantization.py
"""

from __future__ import annotations

import json
import sys
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
        results[quantization] = {
            "bytes_per_block": int(block_bytes(span)),
            "server_rss_mib_30_blocks": serve_and_measure("smollm2", 0, source.num_blocks, "float32",
                                                           ("--quantization", quantization))["rss_mib"],
            "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
            "mean_abs_logit_error": round(float((logits - reference).abs().mean()), 4),
        }
        del span
    none = results["none"]["bytes_per_block"]
    for values in results.values():
        values["bytes_vs_float32"] = round(values["bytes_per_block"] / none, 3)
    print(json.dumps({"model": source.name, "tokens": int(ids.shape[1]), "baseline": "float32 transformers",
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
