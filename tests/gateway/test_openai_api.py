"""The official `openai` client against the gateway over a real 3-server swarm: same text as local transformers."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from typing import Any

import openai
import pytest
import requests
import torch

from tests.conftest import chat_ids
from tests.gateway.conftest import TOKEN, GatewayThread, metric, server_sessions, settled_sessions, wait_sessions_freed

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture()
def client(gateway: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def local_answer(local: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int, **sampling: Any) -> tuple[str, int, list[int]]:
    """Text, prompt length and generated ids from plain transformers."""
    settings: dict[str, Any] = {"do_sample": False, **sampling}
    with torch.no_grad():
        out = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **settings)
    generated = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(generated, skip_special_tokens=True), ids.shape[1], generated


def expected_finish(generated: list[int], max_tokens: int) -> str:
    return "stop" if generated and generated[-1] == 2 else "length" if len(generated) >= max_tokens else "stop"


# ---- models and keys ------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]  # the model, then the model with each published adapter
    assert ids[0] == MODEL and all(i.startswith(f"{MODEL}:") for i in ids[1:])
    assert models.data[0].owned_by == "llmswarm"
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("smollm2").id == MODEL  # the SPEC is an alias
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_wrong_or_missing_key_is_refused(gateway: GatewayThread) -> None:
    wrong = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    bare = requests.post(f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert bare.status_code == 401
    assert bare.headers["WWW-Authenticate"] == "Bearer"
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in bare.json()["error"]["message"]
    basic = requests.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Basic {TOKEN}"}, timeout=10)
    assert basic.status_code == 401
    # probes, metrics and the chat page stay open
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/chat.js"):
        assert requests.get(f"{gateway.url}{path}", timeout=10).status_code == 200, path


# ---- exact match --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["What is the capital of France?", "Write a haiku about the sea."])
def test_chat_completion_equals_local(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any, swarm3: Any, prompt: str) -> None:
    ids = chat_ids(tokenizer, prompt)
    text, prompt_tokens, generated = local_answer(local_smollm2, tokenizer, ids, 40)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected_finish(generated, 40)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, len(generated))
    assert reply.usage.total_tokens == prompt_tokens + len(generated)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    chain = reply.model_extra["llmswarm"]["chain"]
    assert chain[0]["start"] == 0 and chain[-1]["end"] == 30
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(chain))
    assert {hop["server"] for hop in chain} <= {s.id for s in swarm3.routes().servers}


def test_streamed_chat_completion_equals_local(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any) -> None:
    prompt = "List three prime numbers and explain why they are prime."
    text, prompt_tokens, generated = local_answer(local_smollm2, tokenizer, chat_ids(tokenizer, prompt), 48)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
                                            max_tokens=48, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["llmswarm"]["chain"][0]["start"] == 0  # the servers are named from the first chunk on
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    assert len(pieces) > 10, "the answer should arrive in many pieces"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == expected_finish(generated, 48)
    assert finals[0].model_extra["llmswarm"]["chain"][-1]["end"] == 30
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, len(generated))
    assert len({c.id for c in chunks}) == 1


def test_text_completion_equals_local(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any) -> None:
    prompt = "The three largest cities of Germany are"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    text, prompt_tokens, generated = local_answer(local_smollm2, tokenizer, ids, 20)
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    assert reply.choices[0].text == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, len(generated))
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    echoed = client.completions.create(model=MODEL, prompt=ids[0].tolist(), temperature=0, max_tokens=20, echo=True)
    assert echoed.choices[0].text == prompt + text  # token ids in, the prompt echoed back as text


def test_default_max_tokens_of_completions_is_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Once upon a time, there was", temperature=0)
    assert reply.usage.completion_tokens <= 16


def test_seeded_sampling_equals_local_even_when_concurrent(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any) -> None:
    """Each request samples with its own generator: a seed gives transformers' answer under torch.manual_seed(seed)."""
    prompt = "Tell me a story about a cat."
    ids = chat_ids(tokenizer, prompt)
    expected = {}
    for seed in (1234, 99):
        torch.manual_seed(seed)
        expected[seed] = local_answer(local_smollm2, tokenizer, ids, 24, do_sample=True, temperature=0.8, top_p=0.9, top_k=0)[0]
    assert expected[1234] != expected[99]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(index: int, seed: int) -> None:
        try:
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   temperature=0.8, top_p=0.9, seed=seed, max_tokens=24)
            results[index] = reply.choices[0].message.content or ""
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i, seed)) for i, seed in enumerate((1234, 99, 1234))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == {0: expected[1234], 1: expected[99], 2: expected[1234]}


def test_stop_sequences_end_the_answer_before_them(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30)
    assert "Paris" in (full.choices[0].message.content or "")
    reply = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30, stop=["Paris", "zebra"])
    text = reply.choices[0].message.content or ""
    assert full.choices[0].message.content.startswith(text) and text and "Paris" not in text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=30, stop="Par", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # "Par" ends mid-token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_continuing_an_assistant_message_and_logit_bias(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    ids = tokenizer.apply_chat_template(messages, continue_final_message=True, return_tensors="pt")["input_ids"]
    text, _, generated = local_answer(local_smollm2, tokenizer, ids, 12)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == text
    # a bias of -100 on the token greedy decoding picks first: the answer must start differently
    biased = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            logit_bias={str(generated[0]): -100})
    assert not (biased.choices[0].message.content or "").startswith(tokenizer.decode(generated[:1]))


# ---- sharing the swarm ----------------------------------------------------------------------------------------


def test_concurrent_streams_progress_together(client: openai.OpenAI, local_smollm2: Any, tokenizer: Any,
                                              model3: Any) -> None:
    prompts = [f"Name a famous {thing}." for thing in ("painter", "river", "city", "poet")]
    loop = model3.decode_loop  # the gateway's generations run in the client's decode loop (decode_loop.py)
    rounds, rows = loop.rounds, loop.rows
    expected = [local_answer(local_smollm2, tokenizer, chat_ids(tokenizer, p), 20)[0] for p in prompts]
    first: dict[int, float] = {}
    finished: dict[int, float] = {}
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[index]}],
                                                    temperature=0, max_tokens=20, stream=True)
            pieces = []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first.setdefault(index, time.monotonic())
                    pieces.append(chunk.choices[0].delta.content)
            finished[index] = time.monotonic()
            texts[index] = "".join(pieces)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [texts[i] for i in range(4)] == expected
    assert max(first.values()) < min(finished.values()), "every stream should start before any finishes"
    assert loop.rows - rows >= 4 and loop.rounds - rounds < loop.rows - rows, "the streams did not share rounds"


def _raw_post(gateway: GatewayThread, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket and do not read the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_metric(gateway: GatewayThread, name: str, value: float, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        got = metric(requests.get(f"{gateway.url}/metrics", timeout=5).text, name)
        if got == value or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_full_queue_is_refused_with_429_and_leaving_clients_free_everything(gateway: GatewayThread, client: openai.OpenAI,
                                                                          swarm3: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story about dragons."}],
            "temperature": 0, "max_tokens": 400}
    before = requests.get(f"{gateway.url}/metrics", timeout=5).text
    sessions_before = settled_sessions(swarm3)  # others' sessions may be open: counts are compared with these
    running = [n + 4 for n in sessions_before]
    sockets = [_raw_post(gateway, {**body, "stream": i % 2 == 0}) for i in range(8)]  # 4 running + 4 queued
    try:
        assert _wait_metric(gateway, "llmswarm_gateway_active_generations", 4) == 4
        assert _wait_metric(gateway, "llmswarm_gateway_queued_generations", 4) == 4
        deadline = time.monotonic() + 20
        while server_sessions(swarm3) != running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server_sessions(swarm3) == running  # each running generation holds a session on every server
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert caught.value.code == "overloaded"
        assert caught.value.response.headers["Retry-After"] == "1"
    finally:
        for sock in sockets:
            sock.close()
    assert _wait_metric(gateway, "llmswarm_gateway_active_generations", 0) == 0
    assert _wait_metric(gateway, "llmswarm_gateway_queued_generations", 0) == 0
    freed = wait_sessions_freed(swarm3, before=sessions_before)
    assert all(now <= then for now, then in zip(freed, sessions_before, strict=True)), (freed, sessions_before)
    after = requests.get(f"{gateway.url}/metrics", timeout=5).text
    cancelled = (metric(after, "llmswarm_gateway_cancelled_generations_total", reason="disconnected")
                 - metric(before, "llmswarm_gateway_cancelled_generations_total", reason="disconnected"))
    assert cancelled == 8
    # and the gateway still answers
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens >= 1


def test_a_stream_whose_client_vanishes_frees_its_sessions(gateway: GatewayThread, swarm3: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from one to one hundred in words."}],
            "temperature": 0, "max_tokens": 400, "stream": True}
    sessions_before = settled_sessions(swarm3)  # others' sessions may be open: counts are compared with these
    response = requests.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60, stream=True,
                             headers={"Authorization": f"Bearer {TOKEN}"})
    lines = response.iter_lines()
    received = [next(lines) for _ in range(8)]
    assert all(not line or line.startswith(b"data: {") for line in received)
    streaming = server_sessions(swarm3)
    assert all(now > then for now, then in zip(streaming, sessions_before, strict=True)), (streaming, sessions_before)
    response.close()
    freed = wait_sessions_freed(swarm3, timeout=20, before=sessions_before)
    assert all(now <= then for now, then in zip(freed, sessions_before, strict=True)), (freed, sessions_before)


# ---- metrics -------------------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latencies(gateway: GatewayThread, client: openai.OpenAI) -> None:
    before = requests.get(f"{gateway.url}/metrics", timeout=5).text
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], temperature=0,
                                           max_tokens=6)
    after = requests.get(f"{gateway.url}/metrics", timeout=5).text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("llmswarm_gateway_requests_total", endpoint="chat_completions", status="ok") == 1
    assert grew("llmswarm_gateway_request_duration_seconds_count", endpoint="chat_completions") == 1
    assert grew("llmswarm_gateway_tokens_total", kind="prompt") == reply.usage.prompt_tokens
    assert grew("llmswarm_gateway_tokens_total", kind="completion") == reply.usage.completion_tokens
    assert grew("llmswarm_gateway_time_to_first_token_seconds_count") == 1
    assert grew("llmswarm_gateway_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    assert metric(after, "llmswarm_gateway_ready") == 1
