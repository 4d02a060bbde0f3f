"""The model store (llmswarm_core.model_store): filled once per revision, read one span at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmswarm_core.model_store as store
import llmswarm_core.source as source
from llmswarm_core.source import INDEX_FILE, ModelDir, resolve
from llmswarm_node.span_loader import load_span


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 6-block Llama saved as one safetensors file (blocks mixed in one file, as a hub checkpoint)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=6, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


def test_a_second_fill_converts_nothing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conversions: list[Path] = []
    split = store.split_into_blocks
    monkeypatch.setattr(store, "split_into_blocks", lambda model, target, progress=True: (conversions.append(target),
                                                                                         split(model, target, progress)))
    root = tmp_path / "store"
    assert store.fill(str(tiny), root, revision="r1", progress=False) is True
    key = store.store_key(str(tiny), "r1")
    target = root / key
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert store.fill(str(tiny), root, revision="r1", progress=False) is False
    assert conversions == [target]  # one conversion for two fills
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps
    marker = json.loads((target / store.READY_FILE).read_text())
    assert marker["source"] == str(tiny) and marker["revision"] == "r1"
    assert sorted(p.name for p in target.glob("*.safetensors")) == sorted(
        ["client.safetensors", *(f"block-{b:05d}.safetensors" for b in range(6))])
    # Another revision is another directory, filled next to the first.
    assert store.store_key(str(tiny), "r2") != key
    assert store.fill(str(tiny), root, revision="r2", progress=False) is True
    assert len(conversions) == 2 and is_dir(target)


def is_dir(path: Path) -> bool:
    return path.is_dir() and (path / store.READY_FILE).is_file()


def test_the_store_holds_the_same_weights(tiny: Path, tmp_path: Path) -> None:
    store.fill(str(tiny), tmp_path, progress=False)
    original, filled = ModelDir(tiny), ModelDir(tmp_path / store.store_key(str(tiny)))
    assert filled.num_blocks == 6
    for block in range(6):
        for key, tensor in original.block_state(block).items():
            torch.testing.assert_close(filled.block_state(block)[key], tensor, rtol=0, atol=0)
    for key, tensor in original.client_state().items():
        torch.testing.assert_close(filled.client_state()[key], tensor, rtol=0, atol=0)
    filled.tokenizer  # noqa: B018  (the tokenizer files came along)


def test_a_server_start_from_the_store_converts_nothing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a server pod runs: resolve(--model STORE/KEY) is the store's directory as it is, twice."""
    store.fill(str(tiny), tmp_path, progress=False)
    target = tmp_path / store.store_key(str(tiny))
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a server converted the model")

    monkeypatch.setattr(source, "convert_gguf", refuse)
    monkeypatch.setattr(store, "split_into_blocks", refuse)
    monkeypatch.setenv("LLMSWARM_CACHE", str(tmp_path / "server-cache"))
    for _ in range(2):
        assert resolve(str(target), progress=False).path == target
    assert not (tmp_path / "server-cache").exists()
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps


def test_a_server_reads_only_its_span_files(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.fill(str(tiny), tmp_path / "store", progress=False)
    full = tmp_path / "store" / store.store_key(str(tiny))
    opened: list[str] = []
    real_open = source.safe_open
    monkeypatch.setattr(source, "safe_open", lambda path, **kw: (opened.append(Path(path).name), real_open(path, **kw))[1])
    reference = load_span(ModelDir(full), 2, 4, progress=False)
    assert sorted(set(opened)) == ["block-00002.safetensors", "block-00003.safetensors"]
    # A store that holds nothing but the span's files and the metadata serves the span just the same.
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in full.iterdir():
        if not item.name.endswith(".safetensors") or item.name in ("block-00002.safetensors", "block-00003.safetensors"):
            shutil.copyfile(item, partial / item.name)
    assert (partial / INDEX_FILE).is_file() and not (partial / "client.safetensors").exists()
    alone = load_span(ModelDir(partial), 2, 4, progress=False)
    hidden = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(alone.base(inputs_embeds=hidden).last_hidden_state,
                                   reference.base(inputs_embeds=hidden).last_hidden_state, rtol=0, atol=0)


def test_the_fill_command(tiny: Path, tmp_path: Path) -> None:
    """What the fill Job runs, twice: the second run finds the ready marker and does nothing."""
    command = [sys.executable, "-m", "llmswarm_core.model_store", "--source", str(tiny), "--store", str(tmp_path),
               "--revision", "v1", "--key", store.store_key(str(tiny), "v1"), "--quiet"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "filled" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "nothing to do" in second.stdout and "filled" not in second.stdout
    bad = subprocess.run([*command[:4], str(tmp_path / "missing"), *command[5:-3]], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "not a model directory" in bad.stderr
