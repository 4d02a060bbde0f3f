"""Client-trained LoRA through a 3-server local swarm: a training step against local PEFT, and decode throughput
of sessions that each carry their own adapter against sessions without one.

- Training: one Adam step (forward, backward, update) of LoRA r=8 on q_proj and v_proj over a batch of
  `--batch` sequences of about `--tokens` tokens, through the swarm (the client sends its LoRA weights with
  every forward and backward; the servers return their gradients) and with local PEFT on the same data, in
  this process. Medians over `--steps` steps after one warm-up step.
- Decode: `--sessions` inference sessions step together (llmswarm.inference.step_together, what concurrent
  generate() calls do) for `--new-tokens` tokens: once with a different random adapter per session (each
  server runs their rows in one pass, a low-rank delta per row: multi-LoRA batching), once without adapters.
  Aggregate tokens/s, and the servers' mean rows per inference pass (llmswarm_batch_size).

Prints one JSON object.

    python bench/lora.py [--steps 5] [--batch 4] [--tokens 48] [--sessions 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

from llmswarm_core.threads import shared_cores_env

os.environ.update(shared_cores_env(os.environ))  # before torch: this client shares the cores with the servers

import torch
from swarm_metrics import histogram_totals

TEXT = ("Low-rank adapters train a small pair of matrices beside each frozen weight; the swarm keeps the weights, "
        "the client keeps the adapters and the optimizer, and every step sends both ways only what it must. ")


def timed_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        began = time.perf_counter()
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]


def training(swarm_url: str, steps: int, batch_size: int, tokens: int) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from llmswarm import DistributedModelForCausalLM
    from llmswarm_core.source import resolve

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm_url, tuning_mode="lora", lora_config=config,
                                                        progress=False)
    ids = model.tokenizer([TEXT * 4] * batch_size, return_tensors="pt")["input_ids"][:, :tokens]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    local = AutoModelForCausalLM.from_pretrained(resolve("smollm2", progress=False).path, dtype=torch.float32)
    peft_model = get_peft_model(copy.deepcopy(local), config)
    set_peft_model_state_dict(peft_model, model.peft_state_dict())
    swarm_s = statistics.median(timed_steps(model, batch, ids, steps))
    local_s = statistics.median(timed_steps(peft_model, batch, ids, steps))
    return {"swarm_step_ms": round(swarm_s * 1000, 1), "local_peft_step_ms": round(local_s * 1000, 1),
            "swarm_over_local": round(swarm_s / local_s, 2), "batch": batch_size, "tokens": int(ids.shape[1])}


def decode(swarm_url: str, urls: list[str], sessions: int, new_tokens: int, adapters: bool) -> dict[str, float]:
    from llmswarm import DistributedModelForCausalLM
    from llmswarm.inference import InferenceSession, SessionStep, step_together
    from llmswarm.lora import SessionLora
    from llmswarm_core.lora import LoraSpec

    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm_url, progress=False)
    if adapters:
        from peft import LoraConfig

        from llmswarm.lora import LoraWeights

        shape = LoraWeights(model.config, model.arch, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                            torch.float32).packed().shape
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True,
                                              return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    generator = torch.Generator().manual_seed(0)
    opened = []
    for _ in range(sessions):
        lora = None
        if adapters:
            lora = SessionLora(LoraSpec(r=8, alpha=16.0, target_modules=["q_proj", "v_proj"]),
                               torch.randn(shape, generator=generator) * 0.02)
        opened.append(InferenceSession(model.client, model.config.num_hidden_layers, ids.shape[1] + new_tokens + 4,
                                       lora=lora))
    warm_up = 4
    with torch.no_grad():
        inputs = [model.embed_inputs(ids)] * sessions
        for step in range(new_tokens):
            if step == warm_up:
                rows0, passes0 = histogram_totals(urls, "llmswarm_batch_size")
                began = time.perf_counter()
            outputs = step_together([SessionStep(s, h) for s, h in zip(opened, inputs, strict=True)])
            inputs = []
            for out in outputs:
                if isinstance(out, Exception):
                    raise out
                inputs.append(model.embed_inputs(model.lm_head(model.final_norm(out[:, -1:])).argmax(-1)))
        elapsed = time.perf_counter() - began
    rows, passes = histogram_totals(urls, "llmswarm_batch_size")
    for session in opened:
        session.close()
    return {"tok_s": round(sessions * (new_tokens - warm_up) / elapsed, 2),
            "mean_rows_per_pass": round((rows - rows0) / max(1.0, passes - passes0), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    with LocalSwarm(LocalSwarmOptions(model="smollm2", servers=3, port=0, progress=False)) as swarm:
        urls = [s.url for s in swarm.routes().servers]
        train = training(swarm.url, args.steps, args.batch, args.tokens)
        with_adapters = decode(swarm.url, urls, args.sessions, args.new_tokens, adapters=True)
        without = decode(swarm.url, urls, args.sessions, args.new_tokens, adapters=False)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "servers": 3, "training_step": train,
        "decode": {"sessions": args.sessions, "new_tokens": args.new_tokens, "different_adapters": with_adapters,
                   "no_adapters": without,
                   "adapters_over_none": round(with_adapters["tok_s"] / without["tok_s"], 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
