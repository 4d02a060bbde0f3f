"""Shared fixtures: the real default model, a local reference, and a real 3-server swarm."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmswarm_core.source import ModelDir, resolve

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.manual_seed(0)

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def smollm2() -> ModelDir:
    return resolve("smollm2", progress=False)


@pytest.fixture(scope="session")
def local_smollm2(smollm2: ModelDir) -> AutoModelForCausalLM:
    """The reference: plain transformers on the same weights."""
    return AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def swarm3(smollm2: ModelDir) -> Iterator[object]:
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

    options = LocalSwarmOptions(model="smollm2", servers=3, port=0, progress=False, log_dir=OUTPUT / "swarm3-logs")
    with LocalSwarm(options) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def model3(swarm3: object) -> object:
    from llmswarm import DistributedModelForCausalLM

    return DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, progress=False)  # type: ignore[attr-defined]


def chat_ids(tokenizer: object, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
    )
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
