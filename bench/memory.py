"""Resident memory of a block server holding 10 of 30 blocks against one holding all 30.

Starts real `llmswarm serve` processes one at a time, waits until each is ready, and reads
its resident set size (RSS). Prints one JSON object; the baseline (all blocks) is measured
in the same run.

    python bench/memory.py [--model smollm2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import requests

from llmswarm_core.source import resolve


def serve_and_measure(model: str, start: int, end: int, dtype: str, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Start `llmswarm serve` for blocks [start, end), wait until it is ready, return its resident memory."""
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
        rss = psutil.Process(process.pid).memory_info().rss
        return {"blocks": end - start, "rss_mib": round(rss / 2**20, 1)}
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    source = resolve(args.model, progress=False)
    n = source.num_blocks
    block_bytes = sum(t.numel() * t.element_size() for t in source.block_state(0).values())
    part = serve_and_measure(args.model, 0, n // 3, args.dtype)
    full = serve_and_measure(args.model, 0, n, args.dtype)
    print(json.dumps({
        "model": source.name,
        "dtype": args.dtype,
        "num_blocks": n,
        "block_weight_mib": round(block_bytes / 2**20, 2),
        "span_server": part,
        "full_server": full,
        "rss_ratio": round(part["rss_mib"] / full["rss_mib"], 3),
        "rss_saved_mib": round(full["rss_mib"] - part["rss_mib"], 1),
        "expected_saved_mib": round((n - n // 3) * block_bytes / 2**20, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
