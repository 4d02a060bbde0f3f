"""The CUDA serving path end to end: a 3-server local swarm on a GPU against local transformers on the same GPU.

Builds a random Llama model (no download), saves it to a temporary folder, and for each
setting (server dtype / quantization) starts a local swarm of 3 block servers on it
(``python -m llmswarm_node.main --device ... --dtype ... --quantization ...``), loads the
client with ``DistributedModelForCausalLM.from_pretrained`` and generates greedily: 64 new
tokens from a fixed 16-token prompt of random ids, one sequence, timed after an 8-token
warm-up (median of ``--repeats`` runs). The baseline, in the same run: local transformers
with the same dtype on the same device, same prompt, same greedy decoding.

Per setting it reports tokens/s of both, their ratio, the per-hop overhead
((swarm ms/token - local ms/token) / hops), the client-side time per hop step and the
servers' own compute time per pass (their difference is what the transport costs), the
client's local work per token (embedding, final norm, LM head, on ``--client-device``: the
servers' device unless told otherwise), each server's ``/info`` and, where
``nvidia-smi`` can see the server processes, their GPU memory. ``tokens_equal_to_local`` is
the fraction of the 64 tokens equal position by position to the local output; for the
quantized settings the local side is unquantized, so it is agreement, not correctness.
For float32 it also trains through the swarm once from a client on the client device and
once from a client on the CPU (prompt tuning: loss and prompt gradients must agree).

Prints one JSON object (also written to --out). One failing setting records its error and
the tail of its servers' logs; the others still run. Needs the project importable (as the
tests do), e.g. ``pip install -e . --no-deps`` or PYTHONPATH=client:node_image:operator.

    python bench/cuda_swarm.py [--device cuda] [--out FILE]
    python bench/cuda_swarm.py --device cpu --small --settings float32/none --threads 1   # dry run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import torch
from generate import hop_totals
from swarm_metrics import histogram_totals
from transformers import AutoModelForCausalLM, LlamaConfig

from llmswarm import DistributedModelForCausalLM
from llmswarm_core.threads import torch_threads
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

SETTINGS = ("float32/none", "bfloat16/none", "float16/int8", "bfloat16/nf4")
FULL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
            num_hidden_layers=12)
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=4,
             num_hidden_layers=4)
PROMPT_TOKENS = 16
WARMUP_TOKENS = 8
INFO_FIELDS = ("id", "start", "end", "dtype", "quantization", "throughput", "sessions", "cache_bytes_used",
               "cache_bytes_limit")


def build_model(folder: Path, small: bool) -> tuple[LlamaConfig, str]:
    """Save a random Llama model to `folder`; returns its config and a one-line description."""
    torch.manual_seed(0)
    config = LlamaConfig(**(SMALL if small else FULL), rope_theta=10000.0, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    description = (f"random Llama, hidden {config.hidden_size}, {config.num_hidden_layers} blocks, vocab {config.vocab_size}, "
                   f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, {params / 1e6:.0f}M params")
    return config, description


def prompt_ids(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (1, PROMPT_TOKENS), generator=generator)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def greedy(model: Any, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[float, list[int]]:
    """Seconds for a greedy generate() of exactly `new_tokens` tokens, and those tokens."""
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0, eos_token_id=None)
    synchronize(device)
    began = time.perf_counter()
    with torch.no_grad():
        output = model.generate(ids, **settings)
    synchronize(device)
    seconds = time.perf_counter() - began
    return seconds, output[0, ids.shape[1]:].tolist()


def timed(model: Any, ids: torch.Tensor, args: argparse.Namespace, device: str) -> tuple[float, list[list[int]]]:
    """Median seconds of `args.repeats` generations of args.new_tokens after a warm-up, and each run's tokens."""
    greedy(model, ids, WARMUP_TOKENS, device)
    runs = [greedy(model, ids, args.new_tokens, device) for _ in range(args.repeats)]
    return statistics.median(seconds for seconds, _ in runs), [tokens for _, tokens in runs]


def local_baseline(folder: Path, dtype: str, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Local transformers, `dtype`, on args.device: ms per token and the greedy tokens."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(args.device).eval()
    try:
        seconds, runs = timed(model, ids.to(args.device), args, args.device)
    finally:
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"ms_per_token": 1000 * seconds / args.new_tokens, "tokens": runs[0]}


def client_local_ms(model: DistributedModelForCausalLM, steps: int = 20) -> float:
    """The client's own work for one token (embedding, final norm, LM head), in its generate() thread setting."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.no_grad(), torch_threads(model.client.config.decode_threads):
        for _ in range(3):
            model.lm_head(model.final_norm(model.embed_inputs(ids)))
        began = time.perf_counter()
        for _ in range(steps):
            model.lm_head(model.final_norm(model.embed_inputs(ids)))
        return 1000 * (time.perf_counter() - began) / steps


def gpu_mib_by_pid() -> dict[int, float]:
    """GPU memory of each compute process nvidia-smi sees (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in text.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
            usage[int(pid)] = float(mib)
    return usage


def server_reports(swarm: LocalSwarm) -> list[dict[str, Any]]:
    """Each server's /info (memory and throughput fields) and its process's GPU memory where visible."""
    gpu = gpu_mib_by_pid()
    pids = dict(zip(swarm.server_ids, (p.pid for p in swarm.processes), strict=True))
    reports = []
    for server in sorted(swarm.routes().servers, key=lambda s: s.start):
        info = requests.get(f"{server.url}/info", timeout=10).json()
        report = {key: info.get(key) for key in INFO_FIELDS}
        report["gpu_mib_nvidia_smi"] = gpu.get(pids.get(server.id, -1))
        reports.append(report)
    return reports


def agreement(tokens: list[int], reference: list[int]) -> float:
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(reference)


def swarm_run(folder: Path, dtype: str, ids: torch.Tensor, num_blocks: int, swarm: LocalSwarm,
              args: argparse.Namespace) -> dict[str, Any]:
    """Through the started `swarm`: ms per token, tokens, hops and the per-hop breakdown."""
    client_dtype = dtype if args.client_dtype == "match" else args.client_dtype
    model = DistributedModelForCausalLM.from_pretrained(str(folder), swarm=swarm.url, dtype=getattr(torch, client_dtype),
                                                        wire_dtype=dtype, progress=False, device=args.client_device)
    ids = ids.to(args.client_device)
    hops = len(model.client.chain(0, num_blocks))
    urls = [s.url for s in swarm.routes().servers]
    greedy(model, ids, WARMUP_TOKENS, args.client_device)
    hop_before, pass_before = hop_totals(model), histogram_totals(urls, "llmswarm_pass_seconds")
    runs = [greedy(model, ids, args.new_tokens, args.client_device) for _ in range(args.repeats)]
    (hop_s, hop_n), (pass_s, pass_n) = hop_totals(model), histogram_totals(urls, "llmswarm_pass_seconds")
    hop_ms = 1000 * (hop_s - hop_before[0]) / max(hop_n - hop_before[1], 1)
    pass_ms = 1000 * (pass_s - pass_before[0]) / max(pass_n - pass_before[1], 1)
    return {
        "ms_per_token": 1000 * statistics.median(seconds for seconds, _ in runs) / args.new_tokens,
        "tokens": runs[0][1],
        "stable": all(tokens == runs[0][1] for _, tokens in runs),
        "hops": hops,
        "hop_ms": hop_ms,
        "server_pass_ms": pass_ms,
        "client_dtype": client_dtype,
        "client_local_ms": client_local_ms(model),
    }


def training_check(folder: Path, swarm: LocalSwarm, ids: torch.Tensor, device: str) -> dict[str, Any]:
    """One prompt-tuning loss and its prompt gradients from a client on `device` and from one on the CPU."""
    results = {}
    for where in dict.fromkeys((device, "cpu")):
        torch.manual_seed(0)
        model = DistributedModelForCausalLM.from_pretrained(str(folder), swarm=swarm.url, progress=False,
                                                            tuning_mode="ptune", pre_seq_len=4, device=where)
        model.train()
        loss = model(ids.to(where), labels=ids.to(where)).loss
        loss.backward()
        grad = model.prompt_embeddings.weight.grad
        results[where] = (loss.item(), grad.detach().cpu(), str(grad.device))
    (loss, grad, grad_device), (cpu_loss, cpu_grad, _) = results[device], results["cpu"]
    return {"loss": round(loss, 6), "cpu_client_loss": round(cpu_loss, 6), "grad_device": grad_device,
            "grad_max_abs_difference": float((grad - cpu_grad).abs().max()), "grad_norm": float(grad.norm())}


def log_tails(swarm: LocalSwarm, chars: int = 1500) -> dict[str, str]:
    return {log.name: log.read_text(errors="replace")[-chars:] for log in swarm.log_files if log.is_file()}


def run_setting(folder: Path, setting: str, ids: torch.Tensor, num_blocks: int, locals_: dict[str, dict[str, Any]],
                args: argparse.Namespace) -> dict[str, Any]:
    """One setting: its local baseline (cached per dtype), a fresh swarm, the comparison."""
    began = time.perf_counter()
    dtype, quantization = setting.split("/")
    if dtype not in locals_:
        locals_[dtype] = local_baseline(folder, dtype, ids, args)
    local = locals_[dtype]
    server_args = ["--device", args.device, "--quantization", quantization]
    options = LocalSwarmOptions(model=str(folder), servers=args.servers, port=0, progress=False, dtype=dtype,
                                threads=args.threads, server_args=server_args, start_timeout=args.start_timeout)
    swarm = LocalSwarm(options)
    try:
        swarm.start()
        remote = swarm_run(folder, dtype, ids, num_blocks, swarm, args)
        servers = server_reports(swarm)
        training = training_check(folder, swarm, ids, args.client_device) if setting == "float32/none" else None
    except Exception as error:  # noqa: BLE001 - reported in the JSON; the other settings still run
        return {"error": f"{type(error).__name__}: {error}"[:3000], "server_logs": log_tails(swarm),
                "seconds": round(time.perf_counter() - began, 1)}
    finally:
        swarm.stop()
    swarm_ms, local_ms, hops = remote["ms_per_token"], local["ms_per_token"], remote["hops"]
    reference = f"local transformers, {dtype}, {args.device}"
    if quantization != "none":
        reference += f", unquantized: agreement with the {quantization} servers, not correctness"
    return {
        "swarm_tok_s": round(1000 / swarm_ms, 2),
        "local_tok_s": round(1000 / local_ms, 2),
        "ratio_swarm_over_local": round(local_ms / swarm_ms, 3),
        "swarm_ms_per_token": round(swarm_ms, 3),
        "local_ms_per_token": round(local_ms, 3),
        "hops": hops,
        "per_hop_overhead_ms": round((swarm_ms - local_ms) / hops, 3),
        "hop_ms": round(remote["hop_ms"], 3),
        "server_pass_ms": round(remote["server_pass_ms"], 3),
        "per_hop_transport_ms": round(remote["hop_ms"] - remote["server_pass_ms"], 3),
        "client_device": args.client_device,
        "client_dtype": remote["client_dtype"],
        "client_local_ms_per_token": round(remote["client_local_ms"], 3),
        "tokens_equal_to_local": round(agreement(remote["tokens"], local["tokens"]), 4),
        "compared_with": reference,
        "swarm_tokens_same_every_repeat": remote["stable"],
        "servers": servers,
        **({"training": training} if training else {}),
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device of the servers and the local baseline (cuda or cpu)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="DTYPE/QUANTIZATION")
    parser.add_argument("--small", action="store_true", help="a tiny model (hidden 256, 4 blocks) for a CPU dry run")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per side (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per server (0: torch's default)")
    parser.add_argument("--client-dtype", choices=("match", "float32"), default="match",
                        help="dtype of the client's embedding and LM head on the CPU (match: the setting's dtype)")
    parser.add_argument("--start-timeout", type=float, default=150.0, help="seconds for a swarm's servers to come online")
    parser.add_argument("--budget", type=float, default=200.0, help="start no new setting after this many seconds")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--client-device", help="device of the client's local parts (default: --device)")
    args = parser.parse_args()
    args.client_device = args.client_device or args.device
    if args.device.startswith("cuda"):
        assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU (use --device cpu for a dry run)"
    began = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="llmswarm-cuda-swarm-") as tmp:
        folder = Path(tmp) / "model"
        config, description = build_model(folder, args.small)
        ids = prompt_ids(config.vocab_size)
        locals_: dict[str, dict[str, Any]] = {}
        for setting in args.settings:
            if time.perf_counter() - began > args.budget:
                results[setting] = {"skipped": f"past the {args.budget:.0f} s budget"}
                continue
            try:
                results[setting] = run_setting(folder, setting, ids, config.num_hidden_layers, locals_, args)
            except Exception as error:  # noqa: BLE001 - e.g. the local baseline failed; reported in the JSON
                results[setting] = {"error": f"{type(error).__name__}: {error}"[:3000]}
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "model": description,
        "servers": args.servers,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": results,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
