"""One-token passes through a span: the lean decode pass (llmswarm_node/decode.py) against transformers' forward.

Both run in this process on the same span (blocks 10..20 of SmolLM2-135M-Instruct, float32,
one torch thread, as a server's decode steps), each with its own session cache after the
same prompt, alternating step by step so both see the same machine. Prints one JSON
object: median milliseconds per pass each way, the linear layers' share (the same matrix
products alone, the floor of a pass bound by reading weights), and whether every output
and the final caches were bit-identical.

    python bench/decode_pass.py [--steps 200] [--prompt 40] [--blocks 10:20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from llmswarm_core.source import resolve
from llmswarm_node.span import SpanModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--blocks", default="10:20")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, end = (int(x) for x in args.blocks.split(":"))
    span = SpanModel(resolve("smollm2", progress=False), start, end, progress=False)
    hidden_size = span.hidden_size
    torch.manual_seed(0)
    prompt = torch.randn(1, args.prompt, hidden_size)
    caches = {"lean": span.new_cache(start, end), "transformers": span.new_cache(start, end)}
    for cache in caches.values():
        span.forward(prompt, None, None, cache)
    assert span.decode_path(start, end) is not None, "these blocks do not take the lean pass"
    times: dict[str, list[float]] = {name: [] for name in caches}
    identical = True
    for step in range(args.steps):
        hidden = torch.randn(1, 1, hidden_size)
        position = torch.tensor([[args.prompt + step]])
        mask = torch.ones(1, args.prompt + step + 1, dtype=torch.long)
        outputs = []
        for name, cache in caches.items():
            span.lean_decode = name == "lean"
            began = time.perf_counter()
            outputs.append(span.forward(hidden, mask, position, cache))
            times[name].append(time.perf_counter() - began)
        identical &= torch.equal(outputs[0], outputs[1])
    for lean_layer, ref_layer in zip(caches["lean"].layers, caches["transformers"].layers, strict=True):
        identical &= torch.equal(lean_layer.keys, ref_layer.keys) and torch.equal(lean_layer.values, ref_layer.values)

    linears = [m for m in span.base.modules() if type(m) is torch.nn.Linear]
    inputs = {m.in_features: torch.randn(1, 1, m.in_features) for m in linears}
    linear_times = []
    with torch.inference_mode():
        for _ in range(args.steps):
            began = time.perf_counter()
            for m in linears:
                F.linear(inputs[m.in_features], m.weight, m.bias)
            linear_times.append(time.perf_counter() - began)

    warm = slice(min(20, args.steps // 4), None)
    lean_ms = 1000 * statistics.median(times["lean"][warm])
    ref_ms = 1000 * statistics.median(times["transformers"][warm])
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct",
        "blocks": f"{start}:{end}",
        "prompt": args.prompt,
        "steps": args.steps,
        "lean_pass_ms": round(lean_ms, 3),
        "transformers_pass_ms": round(ref_ms, 3),
        "saved_ms": round(ref_ms - lean_ms, 3),
        "linear_layers_only_ms": round(1000 * statistics.median(linear_times[warm]), 3),
        "bit_identical": identical,
    }, indent=1))


if __name__ == "__main__":
    main()
