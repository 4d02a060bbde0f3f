"""Which generate() calls the decode loop takes (decode_loop.DecodeParams), and the processors it builds for them.

The loop's outputs are checked against local transformers in test_swarm_generation.py (greedy from eight threads,
seeded sampling with temperature, top-k, top-p and repetition penalty) and test_failover.py (a server killed while
several loop generations run)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from llmswarm.decode_loop import DecodeParams

MODEL_CONFIG = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def params(**kwargs: object) -> DecodeParams | None:
    return DecodeParams.from_generate(MODEL_CONFIG, dict(kwargs), prompt_length=10)


def test_greedy_with_a_token_budget_runs_in_the_loop():
    got = params(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, 10))
    assert got == DecodeParams(max_new_tokens=8, eos_token_ids=frozenset({2}), do_sample=False, processors=())
    assert params(max_length=14).max_new_tokens == 4  # max_length counts the prompt
    assert params(max_new_tokens=8, streamer=None, stopping_criteria=None) is not None  # None: not given


def test_sampling_settings_become_transformers_processors_in_generates_order():
    got = params(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2,
                 min_new_tokens=3)
    assert got is not None and got.do_sample
    assert [type(p) for p in got.processors] == [RepetitionPenaltyLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                                                 TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]


def test_the_callers_processors_go_after_the_built_in_ones_and_before_the_warpers():
    class Mine(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            return torch.zeros(1, dtype=torch.bool)

    mine, stop = Mine(), Stop()
    got = params(max_new_tokens=8, do_sample=True, top_k=5, repetition_penalty=1.2, logits_processor=[mine],
                 stopping_criteria=[stop])
    assert got is not None
    assert [type(p) for p in got.processors] == [RepetitionPenaltyLogitsProcessor, Mine, TopKLogitsWarper]
    assert got.stopping == (stop,)


def test_greedy_ignores_sampling_warpers():
    got = params(max_new_tokens=8, do_sample=False, top_k=5)
    assert got is not None and got.processors == ()


@pytest.mark.parametrize("kwargs", [
    {"streamer": BaseStreamer()},
    {"logits_processor": [RepetitionPenaltyLogitsProcessor(1.5)], "repetition_penalty": 1.2},  # replaces generate()'s
    {"num_beams": 2},
    {"num_return_sequences": 2, "do_sample": True},
    {"stop_strings": ["."]},
    {"no_repeat_ngram_size": 3},
    {"return_dict_in_generate": True, "output_scores": True},
    {"attention_mask": torch.tensor([[0, 1, 1]])},  # padding: transformers' path handles it
    {"max_new_tokens": 0},
], ids=lambda kwargs: ",".join(kwargs))
def test_anything_else_runs_transformers_generate(kwargs):
    assert params(**{"max_new_tokens": 8, **kwargs}) is None
