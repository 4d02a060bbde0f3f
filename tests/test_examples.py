"""The examples run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_prompt_tuning_example_lowers_the_loss(swarm3):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "prompt_tuning.py"), "--swarm", swarm3.url, "--steps", "12"],
                            capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"loss: first step ([\d.]+), mean of the last \d+ steps ([\d.]+)", result.stdout)
    assert match, result.stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first * 0.7
    assert "prompt tuning: 100%" in result.stderr  # the progress bar


@pytest.mark.integration
def test_lora_tuning_example_trains_publishes_and_generates_by_name(swarm3, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "lora_tuning.py"), "--swarm", swarm3.url,
                             "--steps", "8", "--batch-size", "4", "--name", "example-capitals", "--save", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"loss: first step ([\d.]+), mean of the last \d+ steps ([\d.]+)", result.stdout)
    assert match, result.stdout
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first * 0.8
    assert "lora tuning: 100%" in result.stderr  # the progress bar
    assert "published adapter 'example-capitals'" in result.stdout
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert result.stdout.strip().splitlines()[-1].startswith("Country: Japan. Capital:")
