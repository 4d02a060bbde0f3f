"""The lean one-token pass (decode.py) gives bit-identical outputs and caches, and is used only where exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

from llmswarm_core.source import ModelDir
from llmswarm_node import batching
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
                     positions: bool = True, prompt_mask: torch.Tensor | None = None
                     ) -> tuple[list, list, object, object]:
    """Outputs and caches of the same steps through the decode path and through transformers' forward."""
    results = []
    for lean in (True, False):
        span.lean_decode = lean
        results.append(run_steps(span, start, end, prompt, steps, positions, prompt_mask))
    span.lean_decode = True
    (lean_out, lean_cache), (ref_out, ref_cache) = results
    return lean_out, ref_out, lean_cache, ref_cache


def run_steps(span: SpanModel, start: int, end: int, prompt: torch.Tensor, steps: list[torch.Tensor],
              positions: bool, prompt_mask: torch.Tensor | None) -> tuple[list, object]:
    """A prefill, then one-token steps; with a prompt mask (left padding), positions count real tokens only."""
    rows, past = prompt.shape[:2]
    mask = torch.ones(rows, past, dtype=torch.long) if prompt_mask is None else prompt_mask
    cache = span.new_cache(start, end)
    span.forward(prompt, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, start, end)
    outputs = []
    for hidden in steps:
        position = mask.sum(-1, keepdim=True) if positions else None
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        outputs.append(span.forward(hidden, mask, position, cache, start, end))
    return outputs, cache


def assert_identical(lean_out, ref_out, lean_cache, ref_cache) -> None:
    for a, b in zip(lean_out, ref_out, strict=True):
        assert torch.equal(a, b)
    assert lean_cache.get_seq_length() == ref_cache.get_seq_length()
    for a, b in zip(lean_cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_transformers(name, dtype, tmp_path_factory, counted):
    span = SpanModel(tiny_source(name, EXACT[name], tmp_path_factory), 1, 4, dtype=dtype, progress=False)
    assert span.decode_path(1, 4) is not None and span.decode_path(2, 4) is not None
    counted["run"] = 0
    torch.manual_seed(1)
    prompt = torch.randn(2, 7, 64)
    steps = [torch.randn(2, 1, 64) for _ in range(6)]
    padded = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    # the whole span, a sub-range view, and left padding (a mask with zeros)
    for start, end, positions, prompt_mask in ((1, 4, True, None), (2, 4, False, None), (1, 4, True, padded)):
        assert_identical(*decode_both_ways(span, start, end, prompt, steps, positions, prompt_mask))
    assert counted["run"] == 3 * len(steps)


def test_batched_sessions_bit_identical(smollm2, counted):
    """A combined pass over sessions with different pasts (batching.py: padding on the left) is exact too."""
    span = SpanModel(smollm2, 0, 3, progress=False)
    assert span.decode_path(0, 3) is not None  # built (and checked) before counting
    counted["run"] = 0
    torch.manual_seed(3)
    prompts = [torch.randn(1, n, 576) for n in (4, 9, 1)]
    steps = [[torch.randn(1, 1, 576) for _ in prompts] for _ in range(3)]
    results = []
    for lean in (True, False):
        span.lean_decode = lean
        caches = [span.new_cache(0, 3) for _ in prompts]
        for prompt, cache in zip(prompts, caches, strict=True):
            span.forward(prompt, None, None, cache)
        outputs = [batching.run_steps(span, 0, 3, [batching.StepInput(cache, cache.get_seq_length(), h, None, None)
                                                   for h, cache in zip(hidden, caches, strict=True)])
                   for hidden in steps]
        results.append((outputs, caches))
    (lean_out, lean_caches), (ref_out, ref_caches) = results
    for a, b in zip(lean_out, ref_out, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(lean_caches, ref_caches, strict=True):
        assert_identical([], [], a, b)
    assert counted["run"] == len(steps) + 1  # the one-token prompt's prefill is a decode step too


def test_bit_identical_on_the_real_model(smollm2, counted):
    span = SpanModel(smollm2, 10, 20, progress=False)
    assert span.decode_path(10, 20) is not None
    counted["run"] = 0
    torch.manual_seed(2)
    steps = [torch.randn(1, 1, 576) for _ in range(8)]
    assert_identical(*decode_both_ways(span, 10, 20, torch.randn(1, 40, 576), steps))
    assert counted["run"] == len(steps)


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_architectures_keep_transformers_forward(name, tmp_path_factory):
    span = SpanModel(tiny_source(name, OTHERS[name], tmp_path_factory), 0, 4, progress=False)
    assert span.decode_path(0, 4) is None


def test_steps_it_does_not_take(tmp_path_factory, counted):
    source = tiny_source("llama", EXACT["llama"], tmp_path_factory)
    span = SpanModel(source, 0, 4, progress=False)
    assert span.decode_path(0, 4) is not None
    counted["run"] = 0
    cache = span.new_cache(0, 4)
    span.forward(torch.randn(2, 5, 64), None, None, cache)
    hidden_self = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    span.forward(torch.randn(2, 1, 64), hidden_self, None, cache)  # a new token that may not see itself
    span.forward(torch.randn(2, 2, 64), None, None, cache)  # more than one token
    span.forward(torch.randn(2, 1, 64), None, None, None)  # no cache: a stateless forward
    span.forward(torch.randn(2, 1, 64), None, None, cache, prompts=torch.zeros(4, 2, 1, 64))  # deep prompts
    assert counted["run"] == 0
    span.forward(torch.randn(2, 1, 64), None, None, cache)
    assert counted["run"] == 1

    assert SpanModel(source, 0, 4, progress=False, quantization="int8").decode_path(0, 4) is None
    eager = AutoModelForCausalLM.from_pretrained(source.path, attn_implementation="eager")
    assert DecodePath.build(eager.model, eager.model.layers, eager.config) is None


def test_a_pass_that_differs_is_not_used(tmp_path_factory, monkeypatch, caplog, counted):
    """The span checks the lean pass against transformers' forward before using it (a changed transformers)."""
    from llmswarm_node import decode

    rms_norm = decode._rms_norm
    monkeypatch.setattr(decode, "_rms_norm", lambda hidden, weight, eps: rms_norm(hidden, weight, eps * 2))
    span = SpanModel(tiny_source("llama", EXACT["llama"], tmp_path_factory), 0, 4, progress=False)
    assert span.decode_path(0, 4) is None
    assert "differs from transformers' forward" in caplog.text
    cache = span.new_cache(0, 4)
    span.forward(torch.randn(1, 3, 64), None, None, cache)
    span.forward(torch.randn(1, 1, 64), None, None, cache)
    assert counted["run"] == 4  # the check's own two steps per case, then never again
