"""Aggregate tokens/s with 1, 4, 16 and 32 sessions generating at once.

Swarm: a 3-server local swarm; N client sessions (threads of one client process) each
generate 32 new tokens greedily from their own prompt, all at once. Local: transformers
`generate()` on a batch of the same N prompts (left-padded), in its own process, measured
in the same run. Prints one JSON object:

    {"swarm_tok_s": {"1": ..., "4": ..., "16": ..., "32": ...}, "local_tok_s": {...}, ...}

    python bench/concurrency.py [--new-tokens 32] [--sessions 1,4,16] [--no-push]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from swarm_metrics import histogram_totals

from llmswarm_core.threads import shared_cores_env

TOPICS = ["painter", "river", "city", "poet", "planet", "bird", "ship", "tree", "song", "mountain", "scientist",
          "novel", "bridge", "island", "composer", "desert"]


def prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about a famous {TOPICS[i % 16]}."}],
                                          add_generation_prompt=True, tokenize=False) for i in range(n)]


def local_part(sessions: list[int], new_tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from llmswarm_core.source import resolve

    source = resolve("smollm2", progress=False)
    tokenizer = source.tokenizer()
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    result = {}
    for n in sessions:
        batch = tokenizer(prompts(tokenizer, n), return_tensors="pt", padding=True)
        settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(**batch, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
            began = time.perf_counter()
            out = model.generate(**batch, **settings)
        result[str(n)] = n * (out.shape[1] - batch["input_ids"].shape[1]) / (time.perf_counter() - began)
    return result


def swarm_part(sessions: list[int], new_tokens: int, push: bool = True) -> dict[str, object]:
    from llmswarm import ClientConfig, DistributedModelForCausalLM
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    result: dict[str, float] = {}
    mean_batch: dict[str, float] = {}
    with LocalSwarm(LocalSwarmOptions(model="smollm2", servers=3, port=0, progress=False)) as swarm:
        model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False,
                                                            client_config=ClientConfig(push=push))
        urls = [s.url for s in swarm.routes().servers]
        tokenizer = model.tokenizer
        for n in sessions:
            inputs = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts(tokenizer, n)]
            counts = [0] * n
            barrier = threading.Barrier(n + 1)

            def client(i: int, inputs: list[torch.Tensor] = inputs, barrier: threading.Barrier = barrier,
                       counts: list[int] = counts) -> None:
                ids = inputs[i]
                barrier.wait()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                counts[i] = out.shape[1] - ids.shape[1]

            model.generate(inputs[0], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
            rows0, passes0 = histogram_totals(urls, "llmswarm_batch_size")
            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for thread in threads:
                thread.start()
            barrier.wait()
            began = time.perf_counter()
            for thread in threads:
                thread.join()
            result[str(n)] = sum(counts) / (time.perf_counter() - began)
            rows, passes = histogram_totals(urls, "llmswarm_batch_size")
            mean_batch[str(n)] = (rows - rows0) / max(1.0, passes - passes0)
    return {"tok_s": result, "mean_batch": mean_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sessions", default="1,4,16,32")
    parser.add_argument("--no-push", dest="push", action="store_false",
                        help="the client carries every hop itself (no server-to-server push), to measure push's effect")
    parser.add_argument("--part", choices=("local", "swarm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sessions = [int(n) for n in args.sessions.split(",")]
    if args.part == "local":
        print(json.dumps(local_part(sessions, args.new_tokens)))
        return
    if args.part == "swarm":
        print(json.dumps(swarm_part(sessions, args.new_tokens, args.push)))
        return

    def part(name: str, env: dict[str, str]) -> dict:
        command = [sys.executable, __file__, "--part", name, "--new-tokens", str(args.new_tokens), "--sessions", args.sessions,
                   *([] if args.push else ["--no-push"])]
        out = subprocess.run(command, env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    local = part("local", {})
    swarm = part("swarm", shared_cores_env(os.environ))  # the client shares the cores with the servers
    first = str(sessions[0])
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct",
        "servers": 3,
        "push": args.push,
        "new_tokens": args.new_tokens,
        "swarm_tok_s": {k: round(v, 2) for k, v in swarm["tok_s"].items()},
        "local_tok_s": {k: round(v, 2) for k, v in local.items()},
        "swarm_scaling": {k: round(v / swarm["tok_s"][first], 2) for k, v in swarm["tok_s"].items()},
        "local_scaling": {k: round(v / local[first], 2) for k, v in local.items()},
        "swarm_mean_batch_rows": {k: round(v, 2) for k, v in swarm["mean_batch"].items()},
    }, indent=1))


if __name__ == "__main__":
    main()
