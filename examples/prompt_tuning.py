"""Prompt-tune SmolLM2 through a swarm on a small dataset shipped with the repository.

The blocks stay on the servers, frozen; only the prompts (``deep_ptune``: one set per
block) live here and learn. The loss is computed on the completion tokens only.

    python examples/prompt_tuning.py                  # starts a local 3-server swarm for the run
    python examples/prompt_tuning.py --swarm URL      # or trains through a running swarm
"""

from __future__ import annotations

import argparse
import random

import torch
from capitals import batches, load_rows, train_steps

from llmswarm import DistributedModelForCausalLM


def train(swarm: str, steps: int, batch_size: int, lr: float, pre_seq_len: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm, tuning_mode="deep_ptune",
                                                        pre_seq_len=pre_seq_len)
    rows = load_rows()
    data = batches(model.tokenizer, rows, batch_size, random.Random(seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    return train_steps(model, data, optimizer, steps, "prompt tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swarm", help="route-map URL (default: start a local 3-server swarm)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--pre-seq-len", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.swarm:
        train(args.swarm, args.steps, args.batch_size, args.lr, args.pre_seq_len, args.seed)
        return
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    with LocalSwarm(LocalSwarmOptions(model="smollm2", servers=3, port=0)) as swarm:
        train(swarm.url, args.steps, args.batch_size, args.lr, args.pre_seq_len, args.seed)


if __name__ == "__main__":
    main()
