"""The per-hop cost of the public path (a client outside the cluster, through the route map's relay) against the
in-cluster path, in the same run on this machine.

One `llmswarm up --relay` swarm of two servers (blocks [0, 15) and [15, 30)) and a third server holding [15, 30)
that serves through the relay as a server behind NAT does (``serve --relay``). Three clients decode the same
greedy tokens, their runs alternating so that all see the same machine:

- ``in_cluster``: straight to the servers' listed addresses (what a client in the cluster does);
- ``public``: ``ClientConfig(relay=True)``: every server through the route map's address, which forwards to the
  cluster's servers;
- ``public_to_nat_server``: the same, with the chain's second server the one behind NAT (through its tunnel).

Each client runs without server-to-server push here, so every hop is one round trip from the client and the
difference per token divided by the hops per token is the relay's cost per hop. On this one machine the network
itself costs nothing; what is measured is the relay's own work (a second HTTP/WebSocket leg, a process in between,
and for a tunnelled server a third leg); a real public path adds its round-trip time.

    python bench/public_path.py [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmswarm import ClientConfig, DistributedModelForCausalLM
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

PROMPT = "Explain in a few sentences why the sky is blue."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    swarm = LocalSwarm(LocalSwarmOptions(servers=2, blocks_per_server=15, port=0, relay=True, progress=False,
                                         threads=1)).start()
    work = Path(tempfile.mkdtemp(prefix="llmswarm-bench-relay-"))
    nat = subprocess.Popen([sys.executable, "-m", "llmswarm_node.main", "--model", "smollm2", "--blocks", "15:30",
                            "--port", "0", "--join", swarm.url, "--relay", "--server-id", "behind-nat",
                            "--identity-file", str(work / "key.pem"), "--threads", "1", "--quiet"],
                           stdout=open(work / "nat.log", "wb"), stderr=subprocess.STDOUT)
    try:
        swarm.wait_online(3)
        clients = {
            "in_cluster": (ClientConfig(push=False), "behind-nat"),
            "public": (ClientConfig(push=False, relay=True), "behind-nat"),
            "public_to_nat_server": (ClientConfig(push=False, relay=True), "local-1"),
        }
        models = {}
        for name, (config, avoid) in clients.items():
            model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, client_config=config,
                                                                progress=False)
            model.client.ban(avoid, 10**9)
            models[name] = model
        ids = models["public"].tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                             add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        tokens: dict[str, list[int]] = {}
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for repeat in range(args.repeats + 1):  # the first round warms up (connections, caches) and is not counted
            for name, model in models.items():
                began = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                if repeat:
                    seconds[name].append(time.perf_counter() - began)
                tokens[name] = out[0].tolist()
        ms_per_token = {name: round(1000 * statistics.median(s) / args.new_tokens, 2) for name, s in seconds.items()}
        hops = 2  # two servers per token, each one round trip from the client (no push)
        print(json.dumps({
            "new_tokens": args.new_tokens, "repeats": args.repeats, "hops_per_token": hops,
            "ms_per_token": ms_per_token,
            "relay_ms_per_hop": round((ms_per_token["public"] - ms_per_token["in_cluster"]) / hops, 2),
            "tunnel_ms_per_hop_over_in_cluster": round(ms_per_token["public_to_nat_server"] - ms_per_token["public"]
                                                       + (ms_per_token["public"] - ms_per_token["in_cluster"]) / hops, 2),
            "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        }, indent=1))
    finally:
        nat.terminate()
        nat.wait(30)
        swarm.stop()


if __name__ == "__main__":
    main()
