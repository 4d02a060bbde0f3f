"""Single-sequence generation: a 3-server local swarm against local transformers, same machine.

Prints one JSON object. Both sides use the same model (SmolLM2-135M-Instruct, float32),
greedy decoding of 64 new tokens, and the same thread budget: local transformers runs
with N torch threads; each block server also gets N threads (one for decode steps), and
since a chain runs its servers one after another, at most N threads compute at any moment.

Each side runs in its own process, loaded once; their runs alternate (local, swarm, swarm,
local, ...) so that both see the same machine, and the medians are reported. Local
transformers keeps OpenMP's default (spinning) wait policy, its best setting when alone;
the swarm's processes share the cores and use llmswarm_core.threads' settings (what `llmswarm up`
uses: idle OpenMP threads sleep).

Per hop, two numbers:
- ``per_hop_overhead_ms``: (swarm ms per token - local ms per token) / hops: everything a
  hop costs against local transformers. It nets two things: a server's pass starts cold
  (between its passes, the other processes ran on the cores), and a server runs one-token
  steps through llmswarm_node/decode.py's lean pass, which is faster than transformers'
  forward of the same blocks (``server_pass_ms`` is that pass);
- ``per_hop_transport_ms``: the client's time from sending a step to a server to having its
  output, minus the server's own compute time for that step (``llmswarm_pass_seconds``):
  what the network path costs (encode, send, receive, decode, hand-offs), without compute.

    python bench/generate.py [--threads N] [--new-tokens 64] [--repeats 5] [--no-push]
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
from swarm_metrics import histogram_totals
from transformers import AutoModelForCausalLM

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm_core.source import resolve
from llmswarm_core.threads import shared_cores_env
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

PROMPT = "Explain in a few sentences why the sky is blue."


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    began = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - began


def hop_totals(model) -> tuple[float, float]:
    """(seconds, steps) from sending a step to having its output, summed over the servers (client side)."""
    if not isinstance(model, DistributedModelForCausalLM):
        return 0.0, 0.0
    stats = model.client.hop_latency().values()
    return sum(mean * steps for steps, mean in stats), sum(steps for steps, _ in stats)


def worker(args: argparse.Namespace) -> None:
    """One side, loaded once; runs what the parent asks on stdin and answers one JSON line each."""
    torch.set_num_threads(args.threads)
    source = resolve("smollm2", progress=False)
    tokenizer = source.tokenizer()
    ids = chat_ids(tokenizer, PROMPT)
    prefill_ids = tokenizer(" ".join(f"word{i}" for i in range(400)), return_tensors="pt")["input_ids"][:, :128]
    swarm = None
    if args.part == "local":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    else:
        options = LocalSwarmOptions(model="smollm2", servers=args.servers, port=0, threads=args.threads, progress=False)
        swarm = LocalSwarm(options).start()
        model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False,
                                                            client_config=ClientConfig(push=args.push))
    urls = [s.url for s in swarm.routes().servers] if swarm else []
    timed_generate(model, ids, 8)  # warm up
    print(json.dumps({"ready": True, "hops": len(model.client.chain(0, source.num_blocks)) if swarm else 0}), flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "decode":
                hops_before, passes_before = hop_totals(model), histogram_totals(urls, "llmswarm_pass_seconds")
                seconds = timed_generate(model, ids, args.new_tokens)
                result = {"seconds": seconds}
                if swarm:
                    (hop_s, hop_n), (pass_s, pass_n) = hop_totals(model), histogram_totals(urls, "llmswarm_pass_seconds")
                    result["hop_ms"] = 1000 * (hop_s - hops_before[0]) / (hop_n - hops_before[1])
                    result["pass_ms"] = 1000 * (pass_s - passes_before[0]) / (pass_n - passes_before[1])
                print(json.dumps(result), flush=True)
            elif command == "prefill":
                print(json.dumps({"seconds": timed_generate(model, prefill_ids, 1)}), flush=True)
            else:
                break
    finally:
        if swarm:
            swarm.stop()


class Side:
    def __init__(self, part: str, args: argparse.Namespace, env: dict[str, str]) -> None:
        command = [sys.executable, __file__, "--part", part, "--threads", str(args.threads), "--new-tokens",
                   str(args.new_tokens), "--servers", str(args.servers), *([] if args.push else ["--no-push"])]
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.hello = self.read()

    def read(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.process.args[3]} side exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--no-push", dest="push", action="store_false",
                        help="the client carries every hop itself (no server-to-server push), to measure push's effect")
    parser.add_argument("--part", choices=("local", "swarm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        worker(args)
        return
    local = Side("local", args, {})
    swarm = Side("swarm", args, shared_cores_env(os.environ))
    runs: dict[str, list[dict]] = {"local": [], "swarm": [], "local_prefill": [], "swarm_prefill": []}
    try:
        for repeat in range(args.repeats):
            order = [("local", local), ("swarm", swarm)] if repeat % 2 == 0 else [("swarm", swarm), ("local", local)]
            for name, side in order:
                runs[name].append(side.ask("decode"))
            for name, side in order:
                runs[f"{name}_prefill"].append(side.ask("prefill"))
    finally:
        local.close()
        swarm.close()

    def median(name: str, key: str = "seconds") -> float:
        return statistics.median(run[key] for run in runs[name])

    hops = int(swarm.hello["hops"])
    local_ms = 1000 * median("local") / args.new_tokens
    swarm_ms = 1000 * median("swarm") / args.new_tokens
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct",
        "threads": args.threads,
        "servers": args.servers,
        "push": args.push,
        "hops": hops,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "local_tok_s": round(1000 / local_ms, 2),
        "swarm_tok_s": round(1000 / swarm_ms, 2),
        "ratio": round(local_ms / swarm_ms, 3),
        "local_prefill_128_s": round(median("local_prefill"), 4),
        "swarm_prefill_128_s": round(median("swarm_prefill"), 4),
        "per_hop_overhead_ms": round((swarm_ms - local_ms) / hops, 3),
        "hop_ms": round(median("swarm", "hop_ms"), 3),
        "server_pass_ms": round(median("swarm", "pass_ms"), 3),
        "per_hop_transport_ms": round(statistics.median(r["hop_ms"] - r["pass_ms"] for r in runs["swarm"]), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
