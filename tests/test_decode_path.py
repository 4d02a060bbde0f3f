"""The lean one-token pass (decode.py) gives bit-identical outputs and caches, and is used only where exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

from llmswarm.source import ModelDir
from llmswarm_node.decode import DecodePath
from llmswarm_node.span import SpanModel

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_hidden_layers=4)
EXACT = {
    "llama": lambda: LlamaConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, attention_bias=True),
    "llama-mha": lambda: LlamaConfig(**COMMON, intermediate_size=96, num_key_value_heads=4),
    "mistral": lambda: MistralConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, intermediate_size=96, num_key_value_heads=2),
}
OTHERS = {
    "bloom": lambda: BloomConfig(vocab_size=128, hidden_size=64, n_head=4, n_layer=4),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, num_local_experts=2),
    "mistral-window": lambda: MistralConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, sliding_window=8),
    "qwen2-window": lambda: Qwen2Config(**COMMON, intermediate_size=96, num_key_value_heads=2, use_sliding_window=True,
                                        sliding_window=8, max_window_layers=0),
}


def tiny_source(name: str, factory, tmp_path_factory) -> ModelDir:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(factory(), dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return ModelDir(path)


@pytest.fixture
def counted(monkeypatch):
    """How many steps went through the decode path."""
    calls = {"run": 0}
    run = DecodePath.run

    def counting(self, *args, **kwargs):
        calls["run"] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(DecodePath, "run", counting)
    return calls


def decode_both_ways(span: SpanModel, start: int, end: int, prompt: torch.Tensor, steps: list[torch.Tensor],
                     monkeypatch, positions: bool = True) -> tuple[list, list, object, object]:
    """Outputs and caches of the same steps through the decode path and through transformers' forward."""
    results = []
    for lean in (True, False):
        with monkeypatch.context() as patch:
            if not lean:
                patch.setattr(DecodePath, "accepts", staticmethod(lambda *args: False))
            results.append(run_steps(span, start, end, prompt, steps, positions))
    (lean_out, lean_cache), (ref_out, ref_cache) = results
    return lean_out, ref_out, lean_cache, ref_cache


def run_steps(span: SpanModel, start: int, end: int, prompt: torch.Tensor, steps: list[torch.Tensor],
              positions: bool) -> tuple[list, object]:
    cache = span.new_cache(start, end)
    span.forward(prompt, None, None, cache, start, end)
    past = prompt.shape[1]
    outputs = []
    for hidden in steps:
        position = torch.full((hidden.shape[0], 1), past) if positions else None
        mask = torch.ones(hidden.shape[0], past + 1, dtype=torch.long)
        outputs.append(span.forward(hidden, mask, position, cache, start, end))
        past += 1
    return outputs, cache


def assert_identical(lean_out, ref_out, lean_cache, ref_cache) -> None:
    for a, b in zip(lean_out, ref_out, strict=True):
        assert torch.equal(a, b)
    assert lean_cache.get_seq_length() == ref_cache.get_seq_length()
    for a, b in zip(lean_cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_transformers(name, dtype, tmp_path_factory, monkeypatch, counted):
    span = SpanModel(tiny_source(name, EXACT[name], tmp_path_factory), 1, 4, dtype=dtype, progress=False)
    torch.manual_seed(1)
    prompt = torch.randn(2, 7, 64)
    steps = [torch.randn(2, 1, 64) for _ in range(6)]
    for start, end, positions in ((1, 4, True), (2, 4, False)):  # the whole span, and a sub-range view
        lean_out, ref_out, lean_cache, ref_cache = decode_both_ways(span, start, end, prompt, steps, monkeypatch,
                                                                    positions)
        assert_identical(lean_out, ref_out, lean_cache, ref_cache)
    assert counted["run"] == 2 * len(steps)


def test_bit_identical_on_the_real_model(smollm2, monkeypatch, counted):
    span = SpanModel(smollm2, 10, 20, progress=False)
    torch.manual_seed(2)
    steps = [torch.randn(1, 1, 576) for _ in range(8)]
    assert_identical(*decode_both_ways(span, 10, 20, torch.randn(1, 40, 576), steps, monkeypatch))
    assert counted["run"] == len(steps)


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_architectures_keep_transformers_forward(name, tmp_path_factory):
    span = SpanModel(tiny_source(name, OTHERS[name], tmp_path_factory), 0, 4, progress=False)
    assert span._decode_path(0, 4) is None


def test_steps_it_does_not_take(tmp_path_factory, counted):
    source = tiny_source("llama", EXACT["llama"], tmp_path_factory)
    span = SpanModel(source, 0, 4, progress=False)
    cache = span.new_cache(0, 4)
    span.forward(torch.randn(2, 5, 64), None, None, cache)
    padded = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    span.forward(torch.randn(2, 1, 64), padded, None, cache)  # padding needs a mask
    span.forward(torch.randn(2, 2, 64), None, None, cache)  # more than one token
    span.forward(torch.randn(2, 1, 64), None, None, None)  # no cache: a stateless forward
    span.forward(torch.randn(2, 1, 64), None, None, cache, prompts=torch.zeros(4, 2, 1, 64))  # deep prompts
    assert counted["run"] == 0
    span.forward(torch.randn(2, 1, 64), None, None, cache)
    assert counted["run"] == 1

    assert SpanModel(source, 0, 4, progress=False, quantization="int8")._decode_path(0, 4) is None
    eager = AutoModelForCausalLM.from_pretrained(source.path, attn_implementation="eager")
    assert DecodePath.build(eager.model, eager.model.layers, eager.config) is None
