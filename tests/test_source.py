"""Model sources: the per-block cache of the GGUF default model, and reading only a span."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmswarm_core.source import INDEX_FILE, ModelSourceError, resolve, smollm2_gguf_path
from llmswarm_node.span import SpanModel


def test_second_resolve_reuses_the_cache(smollm2, capsys):
    index = smollm2.path / INDEX_FILE
    before = index.stat().st_mtime_ns
    again = resolve("smollm2", progress=False)
    assert again.path == smollm2.path
    assert index.stat().st_mtime_ns == before
    assert "converting" not in capsys.readouterr().out
    files = sorted(p.name for p in smollm2.path.glob("*.safetensors"))
    assert files == sorted(["client.safetensors", *[f"block-{i:05d}.safetensors" for i in range(30)]])


@pytest.mark.integration
def test_cache_equals_the_gguf_loaded_model(smollm2, local_smollm2):
    gguf = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        torch.testing.assert_close(local_smollm2(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert local_smollm2.config.rope_parameters["rope_theta"] == direct.config.rope_parameters["rope_theta"] == 100000.0
    # Older readers default a missing top-level rope_theta to 10000 and produce wrong text: keep it explicit.
    assert json.loads((smollm2.path / "config.json").read_text())["rope_theta"] == 100000.0


def test_span_holds_only_its_blocks(smollm2):
    span = SpanModel(smollm2, 10, 20, progress=False)
    params = sum(p.numel() for p in span.base.parameters())
    per_block = sum(t.numel() for t in smollm2.block_state(0).values())
    embed_row = smollm2.config.hidden_size  # the shell keeps a 1-token embedding
    assert params == 10 * per_block + embed_row
    assert len(span.layers(span.base)) == 10


def test_bad_specs(tmp_path):
    with pytest.raises(ModelSourceError, match="not a model directory"):
        resolve(str(tmp_path / "missing-model"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="no safetensors"):
        resolve(str(tmp_path))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(ModelSourceError, match=r"not a model directory or a \.gguf"):
        resolve(str(not_a_model))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", "escape.safetensors"])
def test_index_files_must_stay_inside_the_model_directory(tmp_path, name):
    """A model repository's index names the weight files; none may lead outside the directory (a symlink neither)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    (model / "escape.safetensors").symlink_to(outside)
    (model / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"model.layers.0.w": name}}))
    with pytest.raises(ModelSourceError, match="outside the model directory"):
        resolve(str(model))


def test_a_malformed_index_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / INDEX_FILE).write_text("[1, 2]")
    with pytest.raises(ModelSourceError, match="not a safetensors index"):
        resolve(str(tmp_path))


def test_the_cache_lock_never_follows_a_symlink(tmp_path):
    from llmswarm_core.source import file_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock = tmp_path / "cache" / "model.lock"
    lock.parent.mkdir()
    lock.symlink_to(victim)
    with pytest.raises(ModelSourceError, match="symlink"), file_lock(lock):
        pass
    assert victim.read_text() == "keep me"
    plain = tmp_path / "cache" / "plain.lock"
    with file_lock(plain):
        assert plain.is_file()
