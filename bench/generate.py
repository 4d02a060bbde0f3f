"""Single-sequence generation: a 3-server local swarm against local transformers, same machine.

Prints one JSON object. Both sides use the same model (SmolLM2-135M-Instruct, float32),
greedy decoding of 64 new tokens, and the same thread budget: local transformers runs
with N torch threads; each block server also gets N threads (one for decode steps), and
since a chain runs its servers one after another, at most N threads compute at any moment.

Each side runs in its own process. Local transformers keeps OpenMP's default (spinning)
wait policy, its best setting when alone; the swarm's processes share the cores and use
the short spin of llmswarm.threads (what `llmswarm up` uses).

    python bench/generate.py [--threads N] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from llmswarm import DistributedModelForCausalLM
from llmswarm.source import resolve
from llmswarm.threads import shared_cores_env
from llmswarm_operator.local import LocalSwarm, LocalSwarmOptions

PROMPT = "Explain in a few sentences why the sky is blue."


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return time.perf_counter() - began, out.shape[1] - ids.shape[1]


def prefill_seconds(model, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(model, ids, prefill_ids, new_tokens: int, repeats: int) -> dict[str, float]:
    timed_generate(model, ids, 8)  # warm up
    runs = [timed_generate(model, ids, new_tokens) for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in runs)
    generated = runs[0][1]
    return {"tokens_per_s": generated / seconds, "seconds": seconds, "new_tokens": generated,
            "prefill_128_s": prefill_seconds(model, prefill_ids, repeats)}


def run_part(args: argparse.Namespace) -> dict[str, float]:
    """Measure one side in this process."""
    torch.set_num_threads(args.threads)
    source = resolve("smollm2", progress=False)
    tokenizer = source.tokenizer()
    ids = chat_ids(tokenizer, PROMPT)
    prefill_ids = tokenizer(" ".join(f"word{i}" for i in range(400)), return_tensors="pt")["input_ids"][:, :128]
    if args.part == "local":
        local = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
        return measure(local, ids, prefill_ids, args.new_tokens, args.repeats)
    options = LocalSwarmOptions(model="smollm2", servers=args.servers, port=0, threads=args.threads, progress=False)
    with LocalSwarm(options) as swarm:
        model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False)
        result = measure(model, ids, prefill_ids, args.new_tokens, args.repeats)
        result["hops"] = len(model.client.chain(0, source.num_blocks))
    return result


def in_subprocess(part: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, __file__, "--part", part, "--threads", str(args.threads), "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats), "--servers", str(args.servers)]
    output = subprocess.run(command, env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--part", choices=("local", "swarm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return
    local_result = in_subprocess("local", args, {})
    swarm_result = in_subprocess("swarm", args, shared_cores_env(os.environ))
    hops = int(swarm_result["hops"])
    source = resolve("smollm2", progress=False)

    local_ms = 1000 / local_result["tokens_per_s"]
    swarm_ms = 1000 / swarm_result["tokens_per_s"]
    print(json.dumps({
        "model": source.name,
        "threads": args.threads,
        "servers": args.servers,
        "hops": hops,
        "new_tokens": args.new_tokens,
        "local_tok_s": round(local_result["tokens_per_s"], 2),
        "swarm_tok_s": round(swarm_result["tokens_per_s"], 2),
        "ratio": round(swarm_result["tokens_per_s"] / local_result["tokens_per_s"], 3),
        "local_prefill_128_s": round(local_result["prefill_128_s"], 4),
        "swarm_prefill_128_s": round(swarm_result["prefill_128_s"], 4),
        "per_hop_overhead_ms": round((swarm_ms - local_ms) / hops, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
