"""Compute memory is bounded by --compute-memory-bytes (issue #19, item 3): each pass's peak is estimated before it
runs (memory.py, pure), checked against what real passes take, and a server with a small budget refuses what never
fits (too_large) and splits what fits in pieces, keeps serving, and its outputs stay exact."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import requests
import torch
from websockets.sync.client import connect

from llmswarm_core import wire
from llmswarm_node.memory import BlockShape, PassShape, backward_plan, fits, largest_chunk, pass_bytes, rows_per_pass
from llmswarm_node.span import SpanModel
from tests.bounds_harness import running
from tests.helpers import metric_total
from tests.reference import LocalSpan

HIDDEN = 576
EXACT = dict(rtol=1e-5, atol=1e-5)  # the same float32 ops on the same weights, maybe summed in another order
# SmolLM2-135M's blocks in float32 with sdpa attention (what the server runs), and the same with eager attention.
SMOLLM2 = BlockShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, itemsize=4,
                     scores_materialized=False)
SMOLLM2_EAGER = BlockShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, itemsize=4)
GIB = 1024**3


# ---- the estimate (pure) ----------------------------------------------------------------------------------------
def test_the_issues_backward_keeps_every_blocks_activations_and_per_block_keeps_one():
    """1 x 8192 tokens through 10 blocks is within max_tokens_per_request, yet autograd keeps gigabytes."""
    whole = pass_bytes(SMOLLM2, PassShape(1, 8192, 10, grad=True))
    per_block = pass_bytes(SMOLLM2, PassShape(1, 8192, 10, grad=True, per_block=True))
    assert whole > 5 * GIB
    assert per_block < whole / 3
    assert backward_plan(SMOLLM2, 1, 8192, 10, 2 * GIB) == "per_block"
    assert backward_plan(SMOLLM2, 1, 8192, 10, 8 * GIB) == "whole"
    assert backward_plan(SMOLLM2, 1, 8192, 10, 256 * 1024**2) is None


def test_eager_attention_counts_its_scores_quadratically():
    def growth(shape: BlockShape) -> float:
        return pass_bytes(shape, PassShape(1, 4096, 1)) / pass_bytes(shape, PassShape(1, 2048, 1))

    assert growth(SMOLLM2_EAGER) > 3.0  # T^2 scores dominate
    assert growth(SMOLLM2) < 2.5  # memory-efficient attention: about linear
    assert pass_bytes(SMOLLM2_EAGER, PassShape(1, 8192, 1)) > 9 * 8192**2 * 4  # [heads, T, T] float32 at least


def test_a_batched_decode_counts_the_padded_copy_of_every_cache():
    alone = pass_bytes(SMOLLM2, PassShape(8, 1, 10, past=4000))
    stacked = pass_bytes(SMOLLM2, PassShape(8, 1, 10, past=4000, stacked_cache=True))
    assert stacked - alone >= 10 * 8 * 4001 * SMOLLM2.kv_bytes_per_token()


def test_what_fits_a_budget_shrinks_with_it_and_stays_within_it():
    budget = 120 * 1024**2
    chunk = largest_chunk(SMOLLM2, rows=4, new=2000, past=100, blocks=10, limit=256, budget=budget)
    assert 0 < chunk < 256
    assert fits(SMOLLM2, PassShape(4, chunk, 10, 100 + 2000 - chunk), budget)
    assert not fits(SMOLLM2, PassShape(4, chunk + 1, 10, 100 + 2000 - chunk - 1), budget)
    assert largest_chunk(SMOLLM2, 1, 3, 0, 10, 256, GIB) == 3  # a small step: all of it
    assert largest_chunk(SMOLLM2, 64, 1, 8000, 30, 256, 1024**2) == 0  # not even one token
    rows = rows_per_pass(SMOLLM2, rows=32, new=512, blocks=10, budget=budget)
    assert 0 < rows < 32 and fits(SMOLLM2, PassShape(rows, 512, 10), budget)
    assert not fits(SMOLLM2, PassShape(rows + 1, 512, 10), budget)


def test_the_shape_of_a_loaded_span(smollm2):
    span = SpanModel(smollm2, 0, 1, progress=False)
    assert span.block_shape == SMOLLM2


# ---- the estimate against real passes ---------------------------------------------------------------------------
MEASURE = """
import json, sys, psutil, torch
from llmswarm_core.source import resolve
from llmswarm_node.memory import PassShape, pass_bytes
from llmswarm_node.span import SpanModel
kind, blocks, rows, tokens, attention = json.loads(sys.argv[1])
torch.set_num_threads(1)
span = SpanModel(resolve("smollm2", progress=False), 0, blocks, progress=False)
if attention == "eager":
    span.base.config._attn_implementation = "eager"
span.forward(torch.randn(1, 4, 576))
hidden, grad = torch.randn(rows, tokens, 576), torch.randn(rows, tokens, 576)
rss = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM): loading the span may have peaked higher
    refs.write("5")
if kind == "forward":
    span.forward(hidden)
else:
    span.backward(hidden, grad, None, None, 0, blocks, per_block=kind == "per_block")
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
shape = span.block_shape
if attention == "eager":
    import dataclasses
    shape = dataclasses.replace(shape, scores_materialized=True)
estimate = pass_bytes(shape, PassShape(rows, tokens, blocks, grad=kind != "forward", per_block=kind == "per_block"))
print(json.dumps({"measured": peak - rss, "estimated": estimate}))
"""


@pytest.mark.parametrize("case", [
    ("forward", 2, 1, 4096, "sdpa"),
    ("forward", 2, 1, 2048, "eager"),
    ("backward", 4, 1, 2048, "sdpa"),
    ("per_block", 4, 1, 4096, "sdpa"),
    ("backward", 2, 8, 256, "eager"),
])
def test_the_estimate_bounds_the_peak_of_a_real_pass(case):
    """In a fresh process, so that its peak resident memory is the pass's (the span itself is small)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(case)], capture_output=True, text=True,
                            timeout=600, check=True)
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["measured"] <= numbers["estimated"] <= 3 * numbers["measured"], numbers


# ---- splitting is exact ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 4, progress=False)


@pytest.fixture(scope="module")
def reference(local_smollm2):
    return LocalSpan(local_smollm2, 0, 4)


def local_backward(reference: LocalSpan, hidden: torch.Tensor, grad: torch.Tensor,
                   prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input (and deep-prompt) gradients by transformers' own blocks, with autograd."""
    inputs = hidden.clone().requires_grad_(True)
    deep = None if prompts is None else prompts.clone().requires_grad_(True)
    handles = []
    if deep is not None:
        for index, layer in enumerate(reference.base.layers):
            def add(module, args, kwargs, index=index):
                states = args[0] if args else kwargs["hidden_states"]
                prefix = deep.shape[2]
                states = torch.cat([states[:, :prefix] + deep[index], states[:, prefix:]], dim=1)
                return ((states, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": states})
            handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        with torch.enable_grad():
            reference.base(inputs_embeds=inputs, use_cache=False).last_hidden_state.backward(grad)
    finally:
        for handle in handles:
            handle.remove()
    return inputs.grad, None if deep is None else deep.grad


def test_a_backward_block_by_block_equals_the_whole_one_and_transformers(span, reference):
    torch.manual_seed(3)
    hidden, grad = torch.randn(2, 7, HIDDEN), torch.randn(2, 7, HIDDEN)
    prompts = torch.randn(4, 2, 3, HIDDEN) * 0.1
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    whole = span.backward(hidden, grad, mask, None, 0, 4, prompts)
    per_block = span.backward(hidden, grad, mask, None, 0, 4, prompts, per_block=True)
    for a, b in zip(whole, per_block, strict=True):
        torch.testing.assert_close(b, a, **EXACT)
    expected, expected_prompts = local_backward(reference, hidden, grad, prompts)
    unmasked = span.backward(hidden, grad, None, None, 0, 4, prompts, per_block=True)
    torch.testing.assert_close(unmasked[0], expected, **EXACT)
    torch.testing.assert_close(unmasked[1], expected_prompts, **EXACT)


# ---- a server with a small budget -------------------------------------------------------------------------------
def budget_for(shape: BlockShape) -> tuple[int, int]:
    """A budget, and a backward length that fits it only block by block (4 blocks)."""
    budget = 8 * 1024**2
    tokens = next(t for t in range(8, 512, 8) if backward_plan(shape, 1, t, 4, budget) == "per_block")
    return budget, tokens


def post(url: str, kind: str, tensors: dict[str, torch.Tensor]) -> requests.Response:
    return requests.post(f"{url}/v1/{kind}", data=wire.encode({"kind": kind, "start": 0, "end": 4}, tensors), timeout=300)


def test_a_small_budget_refuses_what_never_fits_splits_the_rest_and_stays_exact(span, reference):
    budget, tokens = budget_for(span.block_shape)
    torch.manual_seed(4)
    with running(span, compute_memory_bytes=budget) as (url, _):
        # A backward that fits only block by block: run so, gradients exact.
        hidden, grad = torch.randn(1, tokens, HIDDEN), torch.randn(1, tokens, HIDDEN)
        response = post(url, "backward", {"hidden": hidden, "grad_output": grad})
        assert response.status_code == 200, wire.decode(response.content).header
        torch.testing.assert_close(wire.decode(response.content).tensors["grad_hidden"],
                                   local_backward(reference, hidden, grad)[0], **EXACT)
        # One that does not fit even so (within every request limit): refused, not retryable.
        long = torch.randn(1, 8 * tokens, HIDDEN)
        assert backward_plan(span.block_shape, 1, 8 * tokens, 4, budget) is None
        response = post(url, "backward", {"hidden": long, "grad_output": long})
        refusal = wire.decode(response.content).header
        assert response.status_code == 413 and refusal["code"] == "too_large" and not refusal["retryable"]
        assert "compute memory" in refusal["message"]
        # A forward of many rows: in slices of rows that fit, the output exact.
        rows = torch.randn(12, 96, HIDDEN)
        assert rows_per_pass(span.block_shape, 12, 96, 4, budget) < 12
        response = post(url, "forward", {"hidden": rows})
        assert response.status_code == 200
        # Rows are independent: each equals transformers on that row alone (a batch of 12 in one matmul may sum in
        # another order, 1e-4 apart, as it does in transformers itself).
        expected = torch.cat([reference.forward(rows[i:i + 1]) for i in range(12)])
        torch.testing.assert_close(wire.decode(response.content).tensors["hidden"], expected, **EXACT)
        # A forward not even one row of which fits: refused.
        assert rows_per_pass(span.block_shape, 1, 4000, 4, budget) == 0
        assert post(url, "forward", {"hidden": torch.randn(1, 4000, HIDDEN)}).status_code == 413
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_a_small_budget_runs_steps_in_pieces_and_decodes_sessions_apart_exactly(span, local_smollm2):
    budget, _ = budget_for(span.block_shape)
    prompt_tokens = 240  # within one prefill chunk (256), yet its pass does not fit the budget whole
    # The prefill does not fit whole; two sessions' decode steps fit alone but not stacked.
    assert largest_chunk(span.block_shape, 1, prompt_tokens, 0, 4, 256, budget) < prompt_tokens
    past = prompt_tokens + 4
    assert fits(span.block_shape, PassShape(1, 1, 4, past), budget)
    assert not fits(span.block_shape, PassShape(2, 1, 4, prompt_tokens, stacked_cache=True), budget)
    torch.manual_seed(5)
    prompts = [torch.randn(1, prompt_tokens, HIDDEN) for _ in range(2)]
    steps = [[torch.randn(1, 1, HIDDEN) for _ in range(4)] for _ in range(2)]
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    with running(span, compute_memory_bytes=budget) as (url, server):
        together = threading.Barrier(2)

        def session(index: int) -> None:
            try:
                with connect(url.replace("http://", "ws://") + "/v1/session", compression=None, max_size=None) as sock:
                    sock.send(wire.encode({"kind": "open", "start": 0, "end": 4, "max_length": 512}))
                    opened = wire.decode(sock.recv(timeout=60)).header["session"]
                    for hidden in [prompts[index], *steps[index]]:
                        together.wait(timeout=120)  # both sessions' steps reach the server together
                        sock.send(wire.encode({"kind": "step", "session": opened}, {"hidden": hidden}))
                        outputs[index].append(wire.decode(sock.recv(timeout=120)).tensors["hidden"])
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=session, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        text = requests.get(f"{url}/metrics", timeout=30).text
        passes = metric_total(text, "llmswarm_batch_size_count", kind="inference")
        single_row = metric_total(text, "llmswarm_batch_size_bucket", kind="inference", le="1.0")
        assert passes > 0 and single_row == passes  # no pass stacked two sessions' caches
        # A step of which not even one token fits (long, over a batch of rows): refused, the session goes on.
        with connect(url.replace("http://", "ws://") + "/v1/session", compression=None, max_size=None) as sock:
            sock.send(wire.encode({"kind": "open", "start": 0, "end": 4, "max_length": 2048, "batch_size": 8}))
            opened = wire.decode(sock.recv(timeout=60)).header["session"]
            assert largest_chunk(span.block_shape, 8, 1000, 0, 4, 256, budget) == 0
            sock.send(wire.encode({"kind": "step", "session": opened}, {"hidden": torch.randn(8, 1000, HIDDEN)}))
            refusal = wire.decode(sock.recv(timeout=60)).header
            assert refusal["code"] == "too_large" and "compute memory" in refusal["message"]
            sock.send(wire.encode({"kind": "step", "session": opened}, {"hidden": torch.randn(8, 2, HIDDEN)}))
            assert wire.decode(sock.recv(timeout=60)).kind == "output"  # the session was not dropped
        assert server.node.state == "online"
    piece = largest_chunk(span.block_shape, 1, prompt_tokens, 0, 4, 256, budget)
    for index in range(2):
        # The prompt ran in pieces: transformers given the same pieces gives the same outputs...
        local = LocalSpan(local_smollm2, 0, 4)
        prefill = torch.cat([local.step(prompts[index][:, at:at + piece]) for at in range(0, prompt_tokens, piece)], 1)
        expected = [prefill, *[local.step(hidden) for hidden in steps[index]]]
        for got, want in zip(outputs[index], expected, strict=True):
            torch.testing.assert_close(got, want, **EXACT)
        # ...and given the whole prompt at once, the same within float32 summation order.
        whole = LocalSpan(local_smollm2, 0, 4)
        expected = [whole.step(prompts[index]), *[whole.step(hidden) for hidden in steps[index]]]
        for got, want in zip(outputs[index], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_the_batching_policy_takes_only_companions_that_fit():
    from dataclasses import dataclass

    from llmswarm_node.batch_policy import BatchOptions, decode_group, forward_group

    @dataclass
    class Pending:
        name: str
        rows: int = 1
        new_tokens: int = 1
        key: tuple[int, ...] = (0, 10, 1)
        batchable: bool = True
        enqueued: float = 0.0

    options = BatchOptions(max_batch_rows=64, max_batch_tokens=4096)
    items = [Pending("a", rows=3), Pending("b", rows=2), Pending("c", rows=1)]

    def four_rows(group) -> bool:
        return sum(item.rows for item in group) <= 4

    assert [s.name for s in decode_group(items, options, four_rows)] == ["a", "c"]
    assert [s.name for s in forward_group(items, options, four_rows)] == ["a", "c"]
    assert [s.name for s in decode_group([Pending("big", rows=9), *items], options, four_rows)] == ["big"]  # runs alone
