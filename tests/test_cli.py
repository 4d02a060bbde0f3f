"""The command line as a user runs it: routes, generate, and `up --prompt` (what `make run PROMPT=...` does)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

LLMSWARM = [sys.executable, "-m", "llmswarm_cli.main"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([*LLMSWARM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_routes_table(swarm3):
    result = run("routes", "--swarm", swarm3.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model: SmolLM2-135M-Instruct  blocks: 30")
    assert lines[1].split() == ["ID", "URL", "SPAN", "STATE", "TOKENS/S"]
    assert sorted(line.split()[2] for line in lines[2:5]) == ["0:10", "10:20", "20:30"]
    assert lines[-1] == "min servers per block: 1"


def test_generate_streams_the_answer(swarm3):
    result = run("generate", "--swarm", swarm3.url, "--max-new-tokens", "12", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "The capital of France is Paris." in result.stdout


def test_up_answers_one_prompt_and_stops(tmp_path):
    result = run("up", "--port", "0", "--servers", "2", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "The capital of France is Paris." in result.stdout
    assert "stopping the swarm" in result.stderr


def test_up_refuses_an_impossible_placement():
    result = run("up", "--port", "0", "--servers", "2", "--blocks-per-server", "10")
    assert result.returncode == 1
    assert "blocks [20, 30) have fewer than 1 servers" in result.stderr


def test_unknown_model_is_a_clear_error(swarm3):
    result = run("generate", "--swarm", swarm3.url, "--model", "/nonexistent/model", "hi")
    assert result.returncode != 0
    assert "not a model directory" in result.stderr
