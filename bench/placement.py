"""Placement and rebalancing at scale: 1,000 heterogeneous servers over 80 blocks. Prints JSON.

Simulated swarm (no processes): four server classes of different speed and memory, each
server's capacity jittered by up to +-20 %. In the capacity model of docs/rebalancing.md a
server of capacity ``c`` (block-tokens/s) holding ``L`` blocks serves ``c / L`` tokens/s
through each of them, so the blocks' throughputs always add up to the total capacity and
``upper_bound = total capacity / blocks`` bounds every placement's bottleneck.

1. Fresh plan: :func:`fresh_plan.fresh_plan` (``bench/fresh_plan.py``); reports ``plan_seconds``,
   ``bottleneck_throughput``, ``upper_bound`` and their ``ratio``.
2. Churn: 10 % of the servers (chosen at random) leave. The rebalancer
   (:func:`llmswarm_control.rebalance.plan`, at most ``max_moves`` servers per round, each
   round only if it raises the bottleneck by more than ``min_gain``) runs rounds until the
   bottleneck is within 5 % of a fresh plan for the servers left; reports the rounds and
   moves it took and the time of one round.

    .venv/bin/python bench/placement.py [--servers 1000] [--blocks 80] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from fresh_plan import Capacity, capacity_bottleneck, fresh_plan, upper_bound

from llmswarm_control.rebalance import Server, plan
from llmswarm_core.spans import Span, coverage

#: (name, capacity in block-tokens/s, blocks that fit in memory): an A100-80G-like class down to a small one.
CLASSES = (("a100", 3000.0, 40), ("l4", 1500.0, 12), ("t4", 1000.0, 8), ("small", 500.0, 4))


def swarm(n: int, rng: random.Random) -> list[Capacity]:
    out = []
    for i in range(n):
        name, capacity, memory = CLASSES[i % len(CLASSES)]
        out.append(Capacity(f"{name}-{i}", capacity * rng.uniform(0.8, 1.2), memory))
    return out


def rebalance_after_churn(args: argparse.Namespace, servers: list[Capacity], spans: dict[str, Span],
                          leaving: set[str]) -> dict[str, object]:
    """Servers in `leaving` go; the others keep their spans until rebalance rounds move them."""
    left = [s for s in servers if s.id not in leaving]
    current = {s.id: spans[s.id] for s in left}
    after_churn = capacity_bottleneck(args.blocks, left, current)
    replicas_after_churn = min(coverage(args.blocks, current.values()))
    fresh = capacity_bottleneck(args.blocks, left, fresh_plan(args.blocks, left, redundancy=args.redundancy))
    target = 0.95 * fresh
    rounds = moves = 0
    round_seconds: list[float] = []
    objective = after_churn
    while objective < target and rounds < 1000:
        as_servers = [Server(s.id, current[s.id], s.capacity / len(current[s.id])) for s in left]
        started = time.perf_counter()
        result = plan(args.blocks, as_servers, redundancy=args.redundancy, min_gain=args.min_gain, max_moves=args.max_moves)
        round_seconds.append(time.perf_counter() - started)
        rounds += 1
        if not result.moves:
            break
        moves += len(result.moves)
        current.update(result.spans)
        objective = capacity_bottleneck(args.blocks, left, current)
    return {
        "servers_left": len(left),
        "min_replicas_after_churn": replicas_after_churn,
        "bottleneck_after_churn": round(after_churn, 3),
        "fresh_plan_bottleneck": round(fresh, 3),
        "target": round(target, 3),
        "min_gain": args.min_gain,
        "max_moves_per_round": args.max_moves,
        "rounds": rounds,
        "moves": moves,
        "bottleneck_after_rounds": round(objective, 3),
        "within_5_percent": objective >= target,
        "min_replicas": min(coverage(args.blocks, current.values())),
        "round_seconds_mean": round(sum(round_seconds) / len(round_seconds), 4) if round_seconds else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--redundancy", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn", type=float, default=0.10, help="share of servers that leave")
    parser.add_argument("--min-gain", type=float, default=0.01, help="of each churn round")
    parser.add_argument("--max-moves", type=int, default=10, help="servers moved per churn round, at most")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    servers = swarm(args.servers, rng)

    began = time.perf_counter()
    spans = fresh_plan(args.blocks, servers, redundancy=args.redundancy)
    plan_seconds = time.perf_counter() - began
    value, bound = capacity_bottleneck(args.blocks, servers, spans), upper_bound(args.blocks, servers)

    random_leaving = set(rng.sample([s.id for s in servers], round(args.churn * len(servers))))
    # A correlated loss (a zone going down): the servers whose spans start first, i.e. the front of the model.
    by_start = sorted(servers, key=lambda s: (spans[s.id].start, s.id))
    front_leaving = {s.id for s in by_start[:round(args.churn * len(servers))]}
    churn = {name: rebalance_after_churn(args, servers, spans, leaving)
             for name, leaving in (("random", random_leaving), ("front_of_model", front_leaving))}

    print(json.dumps({
        "servers": len(servers),
        "blocks": args.blocks,
        "classes": [{"name": n, "capacity": c, "max_blocks": m} for n, c, m in CLASSES],
        "redundancy": args.redundancy,
        "min_replicas": min(coverage(args.blocks, spans.values())),
        "plan_seconds": round(plan_seconds, 4),
        "bottleneck_throughput": round(value, 3),
        "upper_bound": round(bound, 3),
        "ratio": round(value / bound, 4),
        "churn": churn,
    }, indent=1))


if __name__ == "__main__":
    main()
