"""Train a LoRA adapter for SmolLM2 through a swarm, publish it, and generate with it by name.

The blocks stay on the servers, frozen; the LoRA weights of every remote block (r=8 on q_proj
and v_proj) live here, travel with each request, and get their gradients back from the
servers. Once trained, the adapter is published to the swarm's route map: any client (or the
OpenAI gateway, as model "SmolLM2-135M-Instruct:NAME") then generates with it by name, and
`--save DIR` writes a plain PEFT adapter directory.

    python examples/lora_tuning.py                  # starts a local 3-server swarm for the run
    python examples/lora_tuning.py --swarm URL      # or trains through a running swarm
"""

from __future__ import annotations

import argparse
import random

import torch
from capitals import batches, load_rows, train_steps
from peft import LoraConfig

from llmswarm import DistributedModelForCausalLM


def train(swarm: str, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm, tuning_mode="lora", lora_config=config)
    data = batches(model.tokenizer, load_rows(), args.batch_size, random.Random(args.seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    train_steps(model, data, optimizer, args.steps, "lora tuning")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved a PEFT adapter to {args.save}", flush=True)
    entry = model.publish_adapter(args.name, replace=True)
    print(f"published adapter {entry['name']!r} ({entry['size']} bytes) to {swarm}", flush=True)

    # Anyone with access to the swarm: the adapter by name, no local copy of it.
    user = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm, active_adapter=args.name, progress=False)
    prompt = user.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    out = user.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    print(f"{args.prompt}{user.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swarm", help="route-map URL (default: start a local 3-server swarm)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="capitals", help="the name to publish the adapter under")
    parser.add_argument("--save", help="also write the adapter as a PEFT directory here")
    parser.add_argument("--prompt", default="Country: Japan. Capital:", help="what to generate from with the adapter")
    args = parser.parse_args()
    if args.swarm:
        train(args.swarm, args)
        return
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    with LocalSwarm(LocalSwarmOptions(model="smollm2", servers=3, port=0)) as swarm:
        train(swarm.url, args)


if __name__ == "__main__":
    main()
