"""What a block server holds: a server with 10 of 30 blocks against one with all 30, and where the memory goes.

Starts real `llmswarm serve` processes one at a time (1, 10 and all blocks), waits until each
is ready, and reads its memory from /proc: resident set size (RSS) and proportional set size
(PSS: shared library pages divided among the processes that map them, what a server adds
to a machine that runs several), each split into anonymous memory (weights, Python
objects, allocator pages) and file pages (shared libraries). The weights a span holds are
counted from its blocks' tensors, so the rest is what the process holds beyond its weights:
the difference between two spans is their weights and nothing else, and the 1-block server
shows the fixed part. The fixed part is then split by import, in a fresh interpreter that
imports what a server imports, one module at a time. Prints one JSON object.

    python bench/memory.py [--model smollm2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from llmswarm_core.source import resolve

MIB = 2**20

# What a server imports, in order; each step's cost is the RSS it adds to a fresh interpreter.
IMPORTS = [
    ("torch", "import torch"),
    ("transformers (top level)", "import transformers"),
    ("transformers model code (pulls torch._dynamo, torch.distributed.tensor)",
     "from transformers import LlamaForCausalLM, LlamaConfig"),
    ("llmswarm server (aiohttp, cryptography, prometheus_client, ...)",
     "import llmswarm_node.main, llmswarm_node.server, llmswarm_node.span_loader"),
]


def memory_of(pid: int) -> dict[str, float]:
    """RSS and PSS of a process, in MiB, with their anonymous and file parts (/proc/PID/smaps_rollup)."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024 / MIB
    return {
        "rss_mib": round(fields["Rss"], 1),
        "pss_mib": round(fields["Pss"], 1),
        "pss_anon_mib": round(fields.get("Pss_Anon", 0.0), 1),
        "pss_file_mib": round(fields.get("Pss_File", 0.0), 1),
    }


def serve_and_measure(model: str, start: int, end: int, dtype: str, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Start `llmswarm serve` for blocks [start, end), wait until it is ready, return its memory (memory_of)."""
    command = [sys.executable, "-m", "llmswarm_node.main", "--model", model, "--blocks", f"{start}:{end}",
               "--port", "0", "--dtype", dtype, "--quiet", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        assert process.stdout is not None
        for line in process.stdout:
            if " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
                break
        if url is None:
            raise RuntimeError(f"server for blocks {start}:{end} exited with {process.wait()}")
        requests.get(f"{url}/readyz", timeout=10).raise_for_status()
        time.sleep(1.0)
        return {"blocks": end - start, **memory_of(process.pid)}
    finally:
        process.terminate()
        process.wait(30)


def import_costs() -> dict[str, float]:
    """The RSS each of IMPORTS adds, in a fresh interpreter (MiB)."""
    code = "\n".join([
        "import json, psutil",
        "rss = lambda: psutil.Process().memory_info().rss / 2**20",
        "costs, before = {}, rss()",
        "costs['python interpreter'] = round(before, 1)",
        *[f"{statement}\nnow = rss(); costs[{label!r}] = round(now - before, 1); before = now"
          for label, statement in IMPORTS],
        "print(json.dumps(costs))",
    ])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    source = resolve(args.model, progress=False)
    n = source.num_blocks
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    block_mib = sum(t.numel() for t in source.block_state(0).values()) * bytes_per / MIB
    servers = {f"{blocks}_blocks": serve_and_measure(args.model, 0, blocks, args.dtype) for blocks in (1, n // 3, n)}
    for server in servers.values():
        server["weights_mib"] = round(server["blocks"] * block_mib, 1)
        server["pss_beyond_weights_mib"] = round(server["pss_mib"] - server["weights_mib"], 1)
    part, full = servers[f"{n // 3}_blocks"], servers[f"{n}_blocks"]
    print(json.dumps({
        "model": source.name,
        "dtype": args.dtype,
        "num_blocks": n,
        "block_weight_mib": round(block_mib, 2),
        "servers": servers,
        "span_over_full": {"pss": round(part["pss_mib"] / full["pss_mib"], 3),
                           "rss": round(part["rss_mib"] / full["rss_mib"], 3)},
        "pss_saved_mib": round(full["pss_mib"] - part["pss_mib"], 1),
        "weights_saved_mib": round(full["weights_mib"] - part["weights_mib"], 1),
        "fixed_part_by_import_rss_mib": import_costs(),
    }, indent=1))


if __name__ == "__main__":
    main()
