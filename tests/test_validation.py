"""Request checks (validation.py) without a server: what passes, and what each refusal says."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from llmswarm_core import wire
from llmswarm_core.wire import ProtocolError
from llmswarm_node import validation
from llmswarm_node.sessions import ServerLimits, Session

H = 8


@dataclass(frozen=True)
class FakeSpan:
    start: int = 2
    end: int = 6
    hidden_size: int = H
    adapters: frozenset[str] = frozenset({"lora"})


SPAN = FakeSpan()
LIMITS = ServerLimits(max_length=32, max_batch=4, max_tokens_per_request=40)


@contextmanager
def refused(code: str, match: str) -> Iterator[None]:
    """A ProtocolError with this code, its message matching `match`."""
    with pytest.raises(ProtocolError, match=match) as caught:
        yield
    assert caught.value.code == code


def session(position: int = 0, batch: int = 1, max_length: int = 16) -> Session:
    s = Session(1, owner=1, start=2, end=5, max_length=max_length, batch_size=batch, wire_dtype="float32", cache=None,
                reserved_bytes=0)
    s.position = position
    return s


def forward(**fields) -> wire.ForwardRequest:
    return wire.ForwardRequest(kind="forward", start=fields.pop("start", 2), end=fields.pop("end", 6), **fields)


def test_blocks_and_adapters_must_be_served_here():
    validation.check_blocks(SPAN, 2, 6)
    validation.check_blocks(SPAN, 3, 4)
    for start, end in ((1, 4), (2, 7), (4, 4), (5, 3)):
        with refused("bad_request", "not inside this server's span"):
            validation.check_blocks(SPAN, start, end)
    validation.check_adapter(SPAN, None)
    validation.check_adapter(SPAN, "lora")
    with refused("bad_request", "unknown adapter 'other'; this server has \\['lora'\\]"):
        validation.check_adapter(SPAN, "other")
    with refused("bad_request", "not inside"):
        validation.check_open(SPAN, wire.OpenRequest(kind="open", start=0, end=3, max_length=8))


def test_a_forward_passes_with_int64_masks_and_positions():
    tensors = {"hidden": torch.randn(2, 3, H), "attention_mask": torch.ones(2, 3, dtype=torch.bool),
               "position_ids": torch.arange(3, dtype=torch.int32).expand(2, -1)}
    inputs = validation.stateless_inputs(SPAN, LIMITS, forward(), tensors)
    assert inputs.hidden is tensors["hidden"] and inputs.tokens == 6
    assert inputs.attention_mask.dtype == torch.int64 and inputs.position_ids.dtype == torch.int64
    assert inputs.prompts is None and inputs.grad_output is None


@pytest.mark.parametrize(("tensors", "code", "match"), [
    ({}, "bad_request", "missing tensor 'hidden'"),
    ({"hidden": torch.randn(1, 2, H), "extra": torch.zeros(1)}, "bad_request", "unknown tensors \\['extra'\\]"),
    ({"hidden": torch.zeros(1, 2, H, dtype=torch.int64)}, "bad_request", "must be float32, float16 or bfloat16"),
    ({"hidden": torch.randn(1, 2, H + 1)}, "bad_request", f"shape \\[batch, tokens>=1, {H}\\]"),
    ({"hidden": torch.randn(1, 0, H)}, "bad_request", "tokens>=1"),
    ({"hidden": torch.randn(2, H)}, "bad_request", "got \\[2, 8\\]"),
    ({"hidden": torch.randn(5, 1, H)}, "too_large", "batch 5 is outside \\[1, 4\\]"),
    ({"hidden": torch.randn(4, 11, H)}, "too_large", "44 tokens in one request, limit 40"),
    ({"hidden": torch.randn(1, 33, H)}, "too_large", "33 new tokens exceed the 32 left"),
    ({"hidden": torch.randn(1, 2, H), "attention_mask": torch.ones(1, 3, dtype=torch.long)}, "bad_request",
     "'attention_mask' must be an integer tensor of shape \\[1, 2\\]"),
    ({"hidden": torch.randn(1, 2, H), "attention_mask": torch.ones(1, 2)}, "bad_request", "'attention_mask' must be"),
    ({"hidden": torch.randn(1, 2, H), "attention_mask": torch.tensor([[1, 2]])}, "bad_request", "only 0 and 1"),
    ({"hidden": torch.randn(1, 2, H), "position_ids": torch.tensor([[0, 1, 2]])}, "bad_request",
     "'position_ids' must be an integer tensor of shape \\[1, 2\\]"),
    ({"hidden": torch.randn(1, 2, H), "position_ids": torch.tensor([[-1, 0]])}, "bad_request", "must lie in \\[0, 32\\)"),
    ({"hidden": torch.randn(1, 2, H), "position_ids": torch.tensor([[31, 32]])}, "bad_request", "must lie in"),
    ({"hidden": torch.randn(1, 2, H), "grad_output": torch.randn(1, 2, H)}, "bad_request", "unknown tensors"),
])
def test_bad_forward_tensors_are_refused(tensors, code, match):
    with refused(code, match):
        validation.stateless_inputs(SPAN, LIMITS, forward(), tensors)


def test_deep_prompts_cover_each_block_and_row_with_a_prefix_within_the_tokens():
    hidden = torch.randn(2, 3, H)
    good = torch.randn(4, 2, 3, H)
    assert validation.stateless_inputs(SPAN, LIMITS, forward(), {"hidden": hidden, "prompts": good}).prompts is good
    sub = forward(start=3, end=5)
    for prompts in (good, torch.randn(2, 1, 3, H), torch.randn(2, 2, 4, H), torch.randn(2, 2, 0, H),
                    torch.randn(2, 2, 1, H + 1), torch.zeros(2, 2, 1, H, dtype=torch.int64), torch.randn(2, 2, H)):
        with refused("bad_request", "'prompts' must be a float tensor \\[2, 2, prefix<=3, 8\\]"):
            validation.stateless_inputs(SPAN, LIMITS, sub, {"hidden": hidden, "prompts": prompts})


def test_a_backward_needs_float_output_gradients_shaped_like_its_input():
    backward = wire.BackwardRequest(kind="backward", start=2, end=6)
    hidden = torch.randn(1, 2, H)
    grad = torch.randn(1, 2, H)
    assert validation.stateless_inputs(SPAN, LIMITS, backward, {"hidden": hidden, "grad_output": grad}).grad_output is grad
    for tensors in ({"hidden": hidden}, {"hidden": hidden, "grad_output": torch.randn(1, 3, H)},
                    {"hidden": hidden, "grad_output": torch.ones(1, 2, H, dtype=torch.int64)}):
        with refused("bad_request", "'grad_output' must be a float tensor shaped like 'hidden' \\[1, 2, 8\\]"):
            validation.stateless_inputs(SPAN, LIMITS, backward, tensors)


def test_a_step_fits_its_session():
    s = session(position=5, batch=2, max_length=8)
    mask = torch.ones(2, 7, dtype=torch.long)
    inputs = validation.step_inputs(SPAN, LIMITS, s, {"hidden": torch.randn(2, 2, H), "attention_mask": mask}, 256)
    assert inputs.attention_mask.shape == (2, 7) and inputs.tokens == 4
    with refused("bad_request", "'hidden' has batch 1, the session was opened with 2"):
        validation.step_inputs(SPAN, LIMITS, s, {"hidden": torch.randn(1, 1, H)}, 256)
    with refused("too_large", "4 new tokens exceed the 3 left in this session"):
        validation.step_inputs(SPAN, LIMITS, s, {"hidden": torch.randn(2, 4, H)}, 256)
    with refused("bad_request", "shape \\[2, 6\\]"):  # past + new tokens
        validation.step_inputs(SPAN, LIMITS, s, {"hidden": torch.randn(2, 1, H), "attention_mask": mask}, 256)


def test_session_deep_prompts_come_with_the_first_step_within_its_first_chunk():
    prompts = torch.randn(3, 1, 4, H)
    first = validation.step_inputs(SPAN, LIMITS, session(), {"hidden": torch.randn(1, 6, H), "prompts": prompts}, 256)
    assert first.prompts is prompts
    with refused("bad_request", "prefix<=2"):  # the first prefill chunk holds 2 tokens
        validation.step_inputs(SPAN, LIMITS, session(), {"hidden": torch.randn(1, 6, H), "prompts": prompts}, 2)
    with refused("bad_request", "deep prompts come with a session's first step only"):
        validation.step_inputs(SPAN, LIMITS, session(position=1), {"hidden": torch.randn(1, 6, H), "prompts": prompts}, 256)


def test_a_push_must_be_for_the_sessions_position():
    validation.check_push_position(3, session(position=3))
    with refused("bad_request", "a push for position 2, the session holds 3 tokens"):
        validation.check_push_position(2, session(position=3))
