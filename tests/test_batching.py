"""Steps of many sessions in one pass through a span: each gets what it would get alone."""

from __future__ import annotations

import threading

import pytest
import requests
import torch

from llmswarm_node.batching import StepInput, run_steps
from llmswarm_node.span import SpanModel
from tests.conftest import chat_ids
from tests.helpers import metric_total

HIDDEN = 576


@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 10, progress=False)


def prefilled(span, hidden):
    cache = span.new_cache(0, 10)
    span.forward(hidden, None, None, cache)
    return cache


def test_batched_decode_equals_solo(span):
    torch.manual_seed(0)
    prompts = [torch.randn(1, n, HIDDEN) for n in (5, 17, 1, 30)] + [torch.randn(2, 9, HIDDEN)]
    solo_caches = [prefilled(span, p) for p in prompts]
    batch_caches = [prefilled(span, p) for p in prompts]
    pasts = [p.shape[1] for p in prompts]
    for _ in range(4):
        steps = [torch.randn(p.shape[0], 1, HIDDEN) for p in prompts]
        solo = [span.forward(h, None, torch.full((h.shape[0], 1), past), cache)
                for h, past, cache in zip(steps, pasts, solo_caches, strict=True)]
        batched = run_steps(span, 0, 10, [StepInput(cache, past, h, None, None)
                                         for h, past, cache in zip(steps, pasts, batch_caches, strict=True)])
        for a, b in zip(solo, batched, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-3)
        pasts = [p + 1 for p in pasts]
    for solo_cache, batch_cache in zip(solo_caches, batch_caches, strict=True):
        assert batch_cache.get_seq_length() == solo_cache.get_seq_length()


def test_a_group_that_meets_again_steps_on_its_combined_cache(span, monkeypatch):
    """The same sessions pass after pass: the combined cache is built once and extended; a session that steps alone
    in between (or a group that changes) builds it afresh. Every output stays what the session gets alone."""
    from llmswarm_node import batching

    built = []
    combine = batching._combine
    monkeypatch.setattr(batching, "_combine", lambda *args: built.append(1) or combine(*args))
    torch.manual_seed(2)
    prompts = [torch.randn(1, n, HIDDEN) for n in (4, 9, 13)]
    solo_caches = [prefilled(span, p) for p in prompts]
    batch_caches = [prefilled(span, p) for p in prompts]
    pasts = [p.shape[1] for p in prompts]

    def step(members: list[int]) -> None:
        hidden = {i: torch.randn(1, 1, HIDDEN) for i in members}
        solo = {i: span.forward(hidden[i], None, torch.full((1, 1), pasts[i]), solo_caches[i]) for i in members}
        batched = run_steps(span, 0, 10, [StepInput(batch_caches[i], pasts[i], hidden[i], None, None) for i in members])
        for i, output in zip(members, batched, strict=True):
            torch.testing.assert_close(output, solo[i], rtol=1e-4, atol=2e-3)
            pasts[i] += 1

    for _ in range(3):
        step([0, 1, 2])
    step([2, 0, 1])  # the same sessions, arrived in another order
    assert len(built) == 1
    step([1])  # alone: its cache is its own again
    step([0, 1, 2])
    step([0, 1, 2])
    step([0, 2])  # a session less
    assert len(built) == 3
    for solo_cache, batch_cache in zip(solo_caches, batch_caches, strict=True):
        assert batch_cache.get_seq_length() == solo_cache.get_seq_length()
        for solo_layer, batch_layer in zip(solo_cache.layers, batch_cache.layers, strict=True):
            torch.testing.assert_close(batch_layer.keys, solo_layer.keys, rtol=1e-4, atol=2e-3)


def test_first_steps_of_different_lengths_share_one_pass(span):
    """Prompts of 3, 11 and 7 tokens (one of them a left-padded batch of 2) in one pass, padded on the right: each
    session gets the outputs and the cache it gets alone, and decodes on from there as it would alone."""
    torch.manual_seed(3)
    prompts = [torch.randn(1, 3, HIDDEN), torch.randn(1, 11, HIDDEN), torch.randn(2, 7, HIDDEN)]
    padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    masks = [None, None, padded]
    positions = [None, None, (padded.cumsum(-1) - 1).clamp(min=0)]
    solo_caches = [span.new_cache(0, 10) for _ in prompts]
    solo = [span.forward(p, m, q, c) for p, m, q, c in zip(prompts, masks, positions, solo_caches, strict=True)]
    caches = [span.new_cache(0, 10) for _ in prompts]
    batched = run_steps(span, 0, 10, [StepInput(c, 0, p, m, q) for p, m, q, c in
                                      zip(prompts, masks, positions, caches, strict=True)])
    for a, b, mask in zip(solo, batched, masks, strict=True):
        assert b.shape == a.shape
        real = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.bool()  # the client's own padding
        torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=2e-3)
    for solo_cache, cache in zip(solo_caches, caches, strict=True):
        assert cache.get_seq_length() == solo_cache.get_seq_length()
    step = [torch.randn(p.shape[0], 1, HIDDEN) for p in prompts]
    step_masks = [None, None, torch.cat([padded, torch.ones(2, 1, dtype=torch.long)], dim=1)]
    step_positions = [torch.full((1, 1), 3), torch.full((1, 1), 11), positions[2][:, -1:] + 1]
    solo_next = [span.forward(h, m, q, c) for h, m, q, c in zip(step, step_masks, step_positions, solo_caches, strict=True)]
    batched_next = run_steps(span, 0, 10, [StepInput(c, p.shape[1], h, m, q) for c, p, h, m, q in
                                           zip(caches, prompts, step, step_masks, step_positions, strict=True)])
    for a, b in zip(solo_next, batched_next, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-3)


def test_sessions_with_padding_masks_batch_correctly(span):
    """A left-padded client batch keeps its own mask inside a combined pass."""
    torch.manual_seed(1)
    prompt = torch.randn(2, 6, HIDDEN)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    other = torch.randn(1, 11, HIDDEN)
    caches = []
    for _ in range(2):
        padded = span.new_cache(0, 10)
        span.forward(prompt, mask, positions, padded)
        caches.append((padded, prefilled(span, other)))
    step, step_other = torch.randn(2, 1, HIDDEN), torch.randn(1, 1, HIDDEN)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_positions = positions[:, -1:] + 1
    solo = span.forward(step, step_mask, step_positions, caches[0][0])
    solo_other = span.forward(step_other, None, torch.tensor([[11]]), caches[0][1])
    batched = run_steps(span, 0, 10, [StepInput(caches[1][0], 6, step, step_mask, step_positions),
                                      StepInput(caches[1][1], 11, step_other, None, None)])
    torch.testing.assert_close(batched[0], solo, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(batched[1], solo_other, rtol=1e-4, atol=2e-3)


def scheduler_session(span, session_id: int, prompt: torch.Tensor):
    from llmswarm_node.sessions import Session

    session = Session(session_id, owner=1, start=0, end=10, max_length=64, batch_size=1, wire_dtype="float32",
                      cache=prefilled(span, prompt), reserved_bytes=0)
    session.position = prompt.shape[1]
    return session


def test_a_lone_step_runs_inline_and_a_step_with_company_waits_for_the_compute_thread(span):
    """A lone decode step skips the hand-offs to the compute thread and back; one with another session due does not."""
    import asyncio

    from llmswarm_node.metrics import ServerMetrics
    from llmswarm_node.scheduler import BatchOptions, Scheduler

    torch.manual_seed(2)
    prompt, step = torch.randn(1, 7, HIDDEN), torch.randn(1, 1, HIDDEN)
    expected = span.forward(step, None, torch.tensor([[7]]), prefilled(span, prompt))
    due = {"sessions": 1}
    scheduler = Scheduler(span, BatchOptions(batch_wait=0.005), ServerMetrics(), lambda now, horizon: due["sessions"])

    async def one_step(session) -> tuple[bool, torch.Tensor]:
        future = scheduler.step(session, step, None, None)
        done_at_once = future.done()
        return done_at_once, await future

    try:
        inline, output = asyncio.run(one_step(scheduler_session(span, 1, prompt)))
        assert inline, "a lone step should have run inline"
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=2e-3)
        due["sessions"] = 2  # another session is mid-generation: this step waits for it on the compute thread
        inline, output = asyncio.run(one_step(scheduler_session(span, 2, prompt)))
        assert not inline
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=2e-3)
    finally:
        scheduler.shutdown()


def batch_stats(swarm) -> tuple[float, float]:
    """(rows, passes) of batched inference passes, summed over the swarm's servers."""
    rows = passes = 0.0
    for server in swarm.routes().servers:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        rows += metric_total(text, "llmswarm_batch_size_sum", kind="inference")
        passes += metric_total(text, "llmswarm_batch_size_count", kind="inference")
    return rows, passes


THINGS = ["painter", "river", "city", "poet", "planet", "bird", "ship", "tree", "song", "mountain", "scientist", "novel",
          "bridge", "island", "composer", "desert"]


_SOLO: dict[str, list[int]] = {}  # prompt -> local greedy output with the most new tokens asked so far


def local_greedy_solo(local, prompt: str, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Local transformers' greedy output for one prompt: a greedy output of n tokens is the first n of a longer
    one (or all of it, where it ended earlier), so each prompt is generated once for the longest length asked."""
    known = _SOLO.get(prompt)
    if known is None or len(known) < ids.shape[1] + new_tokens:
        with torch.no_grad():
            known = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)[0].tolist()
        if len(known) == ids.shape[1] + new_tokens or prompt not in _SOLO:
            _SOLO[prompt] = known
    return [known[: ids.shape[1] + new_tokens]]


def concurrent_generations(swarm, local, clients: int, new_tokens: int) -> tuple[float, float, int]:
    """`clients` threads generate at once through the swarm; each must equal its solo local output."""
    from llmswarm import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False)
    prompts = [f"Name a famous {THINGS[i % 16]}" + ("." if i < 16 else ", and say why.") for i in range(clients)]
    inputs = [chat_ids(model.tokenizer, p) for p in prompts]
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    expected = [local_greedy_solo(local, prompt, ids, new_tokens) for prompt, ids in zip(prompts, inputs, strict=True)]
    rows_before, passes_before = batch_stats(swarm)
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        try:
            start.wait()
            ids = inputs[index]
            results[index] = model.generate(ids, attention_mask=torch.ones_like(ids), **settings).tolist()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [results[i] for i in range(clients)] == expected
    rows, passes = batch_stats(swarm)
    tokens = sum(len(r[0]) - len(i[0]) for r, i in zip(expected, inputs, strict=True))
    return rows - rows_before, passes - passes_before, tokens


@pytest.mark.integration
def test_sixteen_clients_get_their_solo_outputs_and_the_servers_batch(swarm3, local_smollm2):
    rows, passes, tokens = concurrent_generations(swarm3, local_smollm2, clients=16, new_tokens=20)
    # Without batching every step would be its own pass: 3 servers x (one prefill + one pass per further token).
    assert passes < 0.6 * 3 * tokens, f"{passes} passes for {tokens} tokens: the servers did not batch"
    assert rows / passes > 1.5, f"mean batch size {rows / passes:.2f}"


@pytest.mark.integration
def test_thirty_two_concurrent_generations(swarm3, local_smollm2):
    rows, passes, _ = concurrent_generations(swarm3, local_smollm2, clients=32, new_tokens=12)
    assert rows / passes > 1.5


@pytest.mark.integration
def assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within float32 noise of 30 blocks on random inputs (batched and solo passes add in different orders)."""
    assert float((got - want).norm() / want.norm()) < 1e-3  # a wrong cache or position gives errors near 1


def test_steps_driven_together_equal_steps_alone_and_a_failing_session_gets_its_own_error(swarm3):
    """step_together: each session gets what it gets stepping alone; one whose server connection breaks
    (and which has nowhere to fail over to) gets its error, the others their outputs."""
    from llmswarm import ClientConfig
    from llmswarm.errors import SwarmError
    from llmswarm.inference import InferenceSession, SessionStep, step_together
    from llmswarm.sequence_manager import SwarmClient

    client = SwarmClient(swarm3.url, ClientConfig(max_retries=0, busy_timeout=1.0))
    torch.manual_seed(3)
    prompts = [torch.randn(1, n, HIDDEN) for n in (4, 9, 6)]
    steps = [torch.randn(1, 1, HIDDEN) for _ in prompts]
    alone, together = [], []
    for store in (alone, together):
        for prompt in prompts:
            session = InferenceSession(client, 30, max_length=16)
            session.step(prompt)
            store.append(session)
    expected = [s.step(h) for s, h in zip(alone, steps, strict=True)]
    outputs = step_together([SessionStep(s, h) for s, h in zip(together, steps, strict=True)])
    for got, want in zip(outputs, expected, strict=True):
        assert_near(got, want)
    assert all(s.position == p.shape[1] + 1 for s, p in zip(together, prompts, strict=True))

    together[1].spans[1].socket.close()  # its middle server's connection breaks; no other server has blocks 10-20
    outputs = step_together([SessionStep(s, h) for s, h in zip(together, steps, strict=True)])
    assert isinstance(outputs[1], SwarmError)
    expected = [s.step(h) for s, h in zip(alone, steps, strict=True)]
    assert_near(outputs[0], expected[0])
    assert_near(outputs[2], expected[2])
    for session in alone + together:
        session.close()
    client.close()
