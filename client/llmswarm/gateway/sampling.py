"""OpenAI's sampling parameters as transformers logits processors.

Generation always runs transformers' greedy loop (``do_sample=False``); sampling, when
asked for, happens in :class:`SeededSampler`, the last processor: it draws the token
with the request's own ``torch.Generator`` and leaves only that token selectable, so
the greedy argmax picks it. Each request thus has its own random stream: a ``seed``
gives the same answer whatever other requests run at the same time (``torch.manual_seed``
would share one global stream between all threads). With the same seed, the draw equals
transformers' own sampling after ``torch.manual_seed(seed)`` (same warpers, same order).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


def request_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded as asked, else from the system's randomness."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


class SeededSampler(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with a private generator; returns scores with one finite entry."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator) -> None:
        if temperature <= 0:
            raise ValueError("SeededSampler needs a temperature above 0 (0 means greedy decoding)")
        self.generator = generator
        warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = self.warpers(input_ids, scores)
        probs = torch.softmax(warped, dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen, 0.0)  # type: ignore[return-value]


class OpenAIPenalties(LogitsProcessor):
    """`logit_bias`, and `presence_penalty` / `frequency_penalty` over the tokens generated so far.

    As OpenAI defines them: ``logit[j] -= frequency * count[j] + presence * (count[j] > 0)``,
    where count is how often token j occurs in the completion (not the prompt).
    """

    def __init__(self, prompt_length: int, presence: float = 0.0, frequency: float = 0.0,
                 bias: Mapping[int, float] | None = None) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency
        self.bias_ids = torch.tensor(sorted(bias or {}), dtype=torch.long)
        self.bias_values = torch.tensor([bias[i] for i in sorted(bias)] if bias else [], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # type: ignore[assignment]
        if self.bias_ids.numel():
            scores[:, self.bias_ids] += self.bias_values.to(scores.dtype)
        generated = input_ids[:, self.prompt_length:]
        if generated.numel() and (self.presence or self.frequency):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores
