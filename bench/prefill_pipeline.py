"""Would a chunked prefill, flowing through the chain as a pipeline, beat one pass per hop on this machine?

In one process (so that only computation is measured, no transport), the three 10-block spans
of SmolLM2 run a 128-token prompt two ways, alternating run by run:

- ``sequential``: each span in turn, one pass of all 128 tokens on 2 threads (what the
  servers of a 3-server swarm on one 2-core machine do today);
- ``pipelined_<k>``: the prompt in chunks of k tokens, each span on its own thread with one
  torch thread, chunk i+1 entering span 1 while chunk i is in span 2 (what servers on
  separate machines would gain from).

With local transformers' forward of the same prompt (2 threads) as the baseline. The wait
policy is the servers' (``OMP_WAIT_POLICY=PASSIVE``, llmswarm_core.threads), set before torch
is imported. Prints one JSON object with median milliseconds.

    python bench/prefill_pipeline.py [--runs 6]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # after the OpenMP setting, before torch
import json
import queue
import statistics
import threading
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from llmswarm_core.source import resolve
from llmswarm_node.span import SpanModel

TOKENS = 128


def sequential(spans: list[SpanModel], hidden: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    for i, span in enumerate(spans):
        hidden = span.forward(hidden, None, None, span.new_cache(10 * i, 10 * i + 10), 10 * i, 10 * i + 10)
    return hidden


def pipelined(spans: list[SpanModel], hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    queues: list[queue.Queue[torch.Tensor | None]] = [queue.Queue() for _ in range(len(spans) + 1)]

    def stage(i: int) -> None:
        torch.set_num_threads(1)
        span, past = spans[i], 0
        cache = span.new_cache(10 * i, 10 * i + 10)
        with torch.no_grad():
            while (piece := queues[i].get()) is not None:
                n = piece.shape[1]
                queues[i + 1].put(span.forward(piece, None, torch.arange(past, past + n).unsqueeze(0), cache,
                                               10 * i, 10 * i + 10))
                past += n
        queues[i + 1].put(None)

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(len(spans))]
    for thread in threads:
        thread.start()
    for start in range(0, hidden.shape[1], chunk):
        queues[0].put(hidden[:, start:start + chunk])
    queues[0].put(None)
    outputs = []
    while (piece := queues[-1].get()) is not None:
        outputs.append(piece)
    for thread in threads:
        thread.join()
    return torch.cat(outputs, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    source = resolve("smollm2", progress=False)
    spans = [SpanModel(source, start, start + 10, progress=False) for start in (0, 10, 20)]
    local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, TOKENS), generator=torch.Generator().manual_seed(0))

    def local_forward() -> None:
        torch.set_num_threads(2)
        local(ids, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        hidden = local.model.embed_tokens(ids)
        ways: dict[str, Callable[[], object]] = {
            "local_transformers": local_forward,
            "sequential": lambda: sequential(spans, hidden),
            **{f"pipelined_{k}": (lambda k=k: pipelined(spans, hidden, k)) for k in (16, 32, 64)},
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.runs):
            for name, way in ways.items():
                began = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - began)
    result = {name: round(statistics.median(values) * 1000, 1) for name, values in times.items()}
    print(json.dumps({"tokens": TOKENS, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "median_ms": result,
                      "sequential_over_local": round(result["sequential"] / result["local_transformers"], 3),
                      "best_pipelined_over_sequential": round(min(v for k, v in result.items() if k.startswith("pipelined"))
                                                              / result["sequential"], 3)}, indent=1))


if __name__ == "__main__":
    main()
