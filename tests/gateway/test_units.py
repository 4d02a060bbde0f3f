"""The gateway's parts on their own: text pieces and stop sequences, request validation, sampling, slow clients."""

from __future__ import annotations

import asyncio
import socket
import time

import openai
import pytest
import torch
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from llmswarm.gateway.engine import Delta, Failed, Job, SamplingParams
from llmswarm.gateway.errors import ApiError, unavailable
from llmswarm.gateway.metrics import GatewayMetrics
from llmswarm.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, parse_request
from llmswarm.gateway.options import GatewayOptions
from llmswarm.gateway.sampling import OpenAIPenalties, SeededSampler, request_generator
from llmswarm.gateway.streaming import ChatChunks, ClientGone, SseWriter, stream_job
from llmswarm.gateway.text import TextTracker

# ---- TextTracker ---------------------------------------------------------------------------------------------

VOCAB = ["a", "b", "St", "op", "Stop", " ", "\n", "é", "xy"]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def byte_decode(ids: list[int]) -> str:
    """Tokens as bytes: a multi-byte character split over tokens decodes to U+FFFD until complete."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_add_up_to_the_text() -> None:
    tracker = TextTracker(decode)
    pieces = [tracker.add([i]) for i in (0, 1, 5, 8)]
    assert pieces == ["a", "b", " ", "xy"]
    assert tracker.finish() == "" and tracker.text == "ab xy" and not tracker.stopped


def test_stop_sequence_is_cut_and_held_back_until_decided() -> None:
    tracker = TextTracker(decode, stop=["Stop"])
    assert tracker.add([0]) == "a"
    assert tracker.add([2]) == ""  # "St" may begin "Stop": held back
    assert tracker.add([3]) == ""  # "Stop" completed: cut, not shown
    assert tracker.stopped and tracker.text == "a"
    assert tracker.add([0]) == ""  # nothing after a stop
    assert tracker.finish() == ""


def test_held_back_text_is_released_when_it_does_not_become_a_stop() -> None:
    tracker = TextTracker(decode, stop=["Stop"])
    assert tracker.add([2]) == ""
    assert tracker.add([0]) == "Sta"
    assert not tracker.stopped


def test_stop_inside_a_token_and_at_the_end() -> None:
    tracker = TextTracker(decode, stop=["to"])
    assert tracker.add([0, 4, 1]) == "aS"  # "Stop" contains "to"
    assert tracker.stopped and tracker.text == "aS"
    tracker = TextTracker(decode, stop=["b"])
    tracker.add([0])
    assert tracker.finish() == "" and tracker.text == "a"


def test_unfinished_characters_are_not_shown() -> None:
    tracker = TextTracker(byte_decode)
    e_acute = list("é".encode())
    assert tracker.add([ord("x")]) == "x"
    assert tracker.add(e_acute[:1]) == ""
    assert tracker.add(e_acute[1:]) == "é"
    assert tracker.finish() == ""
    unfinished = TextTracker(byte_decode)
    unfinished.add([ord("x"), e_acute[0]])
    assert unfinished.finish() == "\ufffd"  # at the end, what there is is shown


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(VOCAB) - 1), max_size=30),
       stops=st.lists(st.text(alphabet="abStop \né", min_size=1, max_size=4), max_size=4))
def test_pieces_always_add_up_to_the_text_cut_at_the_first_stop(ids: list[int], stops: list[str]) -> None:
    tracker = TextTracker(decode, stop=stops)
    pieces = [tracker.add([i]) for i in ids]
    pieces.append(tracker.finish())
    expected, stopped = decode(ids), False  # the oracle: the first prefix that contains a stop, cut at its earliest one
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            expected, stopped = text[:min(cuts)], True
            break
    assert tracker.text == expected and tracker.stopped == stopped
    assert "".join(pieces) == expected


def test_real_tokenizer_streams_exactly_its_decoding(smollm2: object) -> None:
    tokenizer = smollm2.tokenizer()  # type: ignore[attr-defined]
    text = "Héllo wörld — 你好, 🦜 parrots! 1234\n  indented"
    ids = tokenizer(text)["input_ids"]
    tracker = TextTracker(lambda i: tokenizer.decode(i, skip_special_tokens=True))
    pieces = [tracker.add([i]) for i in ids] + [tracker.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)


# ---- request validation --------------------------------------------------------------------------------------


def refusal(model: type, body: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(model, body)
    assert caught.value.status == 400
    return caught.value


def test_requests_parse_with_openai_defaults() -> None:
    req = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                                       {"type": "text", "text": "b"}]}]})
    assert req.temperature is None and req.stream is False and req.stop_list() == ()
    assert [m.for_template() for m in req.messages] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    one_stop = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\n"}
    assert parse_request(ChatCompletionRequest, one_stop).stop_list() == ("\n",)
    assert parse_request(CompletionRequest, {"model": "m", "prompt": [[1, 2]]}).prompt_text_or_ids() == [1, 2]
    assert parse_request(CompletionRequest, {"model": "m", "prompt": ["x"]}).prompt_text_or_ids() == "x"
    neutral = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [], "logprobs": False, "n": 1,
               "response_format": {"type": "text"}, "user": "u", "temperature": 1, "seed": -5}
    assert parse_request(ChatCompletionRequest, neutral).temperature == 1.0


def test_refusals_name_the_parameter() -> None:
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [], "bogus": 1}).message.startswith("Unrecognized request argument")
    assert refusal(ChatCompletionRequest, {"model": "m"}).param == "messages"
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]}).param == "messages[0].content"
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": "1"}).param == "top_p"
    assert refusal(ChatCompletionRequest, {"model": 3, "messages": [{"role": "user", "content": "x"}]}).param == "model"
    error = refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                            "max_completion_tokens": 4})
    assert error.param == "max_completion_tokens"
    assert refusal(CompletionRequest, {"model": "m", "prompt": [[1], [2]]}).param == "prompt"
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 2}).param == "best_of"
    assert refusal(ChatCompletionRequest, "not an object").message == "The request body must be a JSON object."


# ---- sampling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_seeded_sampler_draws_what_transformers_draws_after_manual_seed(temperature: float, top_p: float) -> None:
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(3)) * 3
    ids = torch.zeros(1, 4, dtype=torch.long)
    sampler = SeededSampler(temperature, top_p, request_generator(42))
    drawn = [int(sampler(ids, logits.clone()).argmax()) for _ in range(20)]
    torch.manual_seed(42)
    expected = []
    for _ in range(20):
        scores = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, logits.clone())) if top_p < 1 else \
            TemperatureLogitsWarper(temperature)(ids, logits.clone())
        expected.append(int(torch.multinomial(torch.softmax(scores, -1), 1)))
    assert drawn == expected
    assert len(set(drawn)) > 1
    only = sampler(ids, logits.clone())
    assert torch.isfinite(only).sum() == 1


def test_unseeded_requests_draw_differently() -> None:
    logits = torch.zeros(1, 1000)
    ids = torch.zeros(1, 1, dtype=torch.long)
    a = [int(SeededSampler(1.0, 1.0, request_generator(None))(ids, logits).argmax()) for _ in range(5)]
    b = [int(SeededSampler(1.0, 1.0, request_generator(None))(ids, logits).argmax()) for _ in range(5)]
    assert a != b
    with pytest.raises(ValueError, match="greedy"):
        SeededSampler(0.0, 1.0, request_generator(1))


def test_penalties_and_bias_follow_openai_formula() -> None:
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[5, 5, 1, 1, 1, 2]])  # prompt of 2 tokens (5, 5), then 1, 1, 1, 2
    out = OpenAIPenalties(prompt_length=2, presence=0.5, frequency=0.25, bias={3: 2.0, 4: -100.0})(ids, scores)
    assert out.tolist() == [[0.0, -(3 * 0.25 + 0.5), -(0.25 + 0.5), 2.0, -100.0, 0.0]]
    assert scores.abs().sum() == 0  # the input is not changed


# ---- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_concurrent", 0, "--max-concurrent"), ("max_tokens", 0, "--max-tokens"), ("write_timeout", 0, "--write-timeout"),
    ("port", 70000, "--port"), ("token", " padded ", "token"), ("token", "", "token"), ("context_length", 1, "--context-length"),
])
def test_options_refuse_what_cannot_work(field: str, value: object, message: str) -> None:
    options = GatewayOptions(swarm="http://x")
    setattr(options, field, value)
    with pytest.raises(ValueError, match=message):
        options.validate()


# ---- a client that stops reading -----------------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """A real socket that never reads: the stream's writes block, and the writer gives up after write_timeout."""
    outcome: dict[str, object] = {}
    payload = "x" * 2000

    async def handler(request: web.Request) -> web.StreamResponse:
        writer = SseWriter(request, write_timeout=0.5)
        await writer.open()
        started = time.monotonic()
        sent = 0
        try:
            for _ in range(20000):  # 40 MB: far more than any socket buffers
                await writer.send(payload)
                sent += 1
        except ClientGone as gone:
            outcome["reason"] = gone.reason
        outcome["seconds"] = time.monotonic() - started
        outcome["sent"] = sent
        return writer.response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 20
        while "seconds" not in outcome and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        sock.close()
        await runner.cleanup()
    assert outcome.get("reason") == "slow_client"
    assert 0.5 <= float(outcome["seconds"]) < 15  # type: ignore[arg-type]
    assert int(outcome["sent"]) < 20000  # type: ignore[call-overload]


# ---- a failure in the middle of a stream ---------------------------------------------------------------------


async def test_a_failure_mid_stream_ends_it_with_an_error_event_the_openai_client_raises() -> None:
    """The stream's protocol on its own: pieces already sent stay, then an error event (what OpenAI sends)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        job = Job([1, 2, 3], SamplingParams(max_tokens=8), asyncio.get_running_loop(), GatewayMetrics())
        job.post(Delta("Hello", [("local-0", 0, 30)]))
        job.post(Delta(" wor"))
        job.post(Failed(unavailable("The swarm could not serve the request: server local-0 is gone")))
        return await stream_job(request, job, ChatChunks("chatcmpl-x", 0, "m"), include_usage=False, write_timeout=5)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    pieces: list[str] = []
    try:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError, match="server local-0 is gone"):
            async for chunk in stream:
                pieces.append(chunk.choices[0].delta.content or "")
    finally:
        await client.close()
        await runner.cleanup()
    assert "".join(pieces) == "Hello wor"
