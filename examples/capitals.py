"""The examples' small dataset (data/capitals.jsonl: a prompt and its completion per line) as training batches."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

DATA = Path(__file__).parent / "data" / "capitals.jsonl"


def load_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def batches(tokenizer: Any, rows: list[dict[str, str]], size: int, rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random batches; the loss is on the completion tokens only (labels -100 elsewhere)."""
    while True:
        chosen = rng.sample(rows, size)
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in chosen]
        answers = [tokenizer(r["completion"])["input_ids"] for r in chosen]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((size, length), tokenizer.pad_token_id or 0)
        labels = torch.full((size, length), -100)
        mask = torch.zeros(size, length, dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            sequence = p + a
            ids[row, :len(sequence)] = torch.tensor(sequence)
            labels[row, len(p):len(sequence)] = torch.tensor(a)  # learn the completion only
            mask[row, :len(sequence)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(model: Any, data: Iterator[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer, steps: int,
                desc: str) -> tuple[float, float]:
    """`steps` optimizer steps with a progress bar; (the first step's loss, the mean of the last five)."""
    first = last = float("nan")
    window: list[float] = []
    with tqdm(range(steps), desc=desc, unit="step") as bar:
        for step in bar:
            optimizer.zero_grad()
            loss = model(**next(data)).loss
            loss.backward()
            optimizer.step()
            window = [*window[-4:], loss.item()]
            if step == 0:
                first = loss.item()
            last = sum(window) / len(window)
            bar.set_postfix(loss=f"{loss.item():.3f}", avg5=f"{last:.3f}")
    print(f"loss: first step {first:.3f}, mean of the last {len(window)} steps {last:.3f}", flush=True)
    return first, last
