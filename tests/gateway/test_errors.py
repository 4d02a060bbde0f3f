"""Bad requests and an unreachable swarm get OpenAI-style errors with the right statuses, and the gateway keeps serving."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from aiohttp import web

from llmswarm.gateway.options import GatewayOptions
from llmswarm_core.routemap import ModelInfo, RouteMap
from tests.gateway.conftest import TOKEN, GatewayThread, metric

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]

# (name, path, body (a dict is sent as JSON, bytes as they are), status, error code, error param)
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("bad JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json", None),
    ("not UTF-8", "/v1/chat/completions", b'{"model": "\xff"}', 400, "invalid_json", None),
    ("nested too deeply", "/v1/chat/completions", b"[" * 30000 + b"]" * 30000, 400, "invalid_json", None),
    ("NaN temperature", "/v1/chat/completions", b'{"model": "x", "messages": [], "temperature": NaN}', 400, "invalid_value", "temperature"),
    ("JSON array", "/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("no model", "/v1/chat/completions", {"messages": HI}, 400, "missing_required_parameter", "model"),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4o", "messages": HI}, 404, "model_not_found", "model"),
    ("unknown argument", "/v1/chat/completions", {"model": MODEL, "messages": HI, "foo": 1}, 400, "unknown_parameter", "foo"),
    ("unknown message field", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x", "x": 1}]},
     400, "unknown_parameter", "messages[0].x"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     400, "invalid_value", "messages[0].role"),
    ("tool role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     400, "invalid_value", "messages[0].role"),
    ("image part", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "invalid_value", "messages[0].content"),
    ("string max_tokens", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": "5"}, 400, "invalid_value", "max_tokens"),
    ("zero max_tokens", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("bool max_tokens", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": True}, 400, "invalid_value", "max_tokens"),
    ("too many tokens", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 100000}, 400, "invalid_value", "max_tokens"),
    ("too many completion tokens", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_completion_tokens": 513},
     400, "invalid_value", "max_completion_tokens"),
    ("hot temperature", "/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ("top_p above 1", "/v1/chat/completions", {"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("n=2", "/v1/chat/completions", {"model": MODEL, "messages": HI, "n": 2}, 400, "invalid_value", "n"),
    ("five stops", "/v1/chat/completions", {"model": MODEL, "messages": HI, "stop": list("abcde")}, 400, "invalid_value", "stop"),
    ("empty stop", "/v1/chat/completions", {"model": MODEL, "messages": HI, "stop": [""]}, 400, "invalid_value", "stop"),
    ("huge seed", "/v1/chat/completions", {"model": MODEL, "messages": HI, "seed": 2**70}, 400, "invalid_value", "seed"),
    ("tools", "/v1/chat/completions", {"model": MODEL, "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "invalid_value", "tools"),
    ("logprobs", "/v1/chat/completions", {"model": MODEL, "messages": HI, "logprobs": True}, 400, "invalid_value", "logprobs"),
    ("json mode", "/v1/chat/completions", {"model": MODEL, "messages": HI, "response_format": {"type": "json_object"}},
     400, "invalid_value", "response_format"),
    ("stream_options without stream", "/v1/chat/completions",
     {"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}}, 400, "invalid_value", "stream_options"),
    ("bias key", "/v1/chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"abc": 1}}, 400, "invalid_value", "logit_bias"),
    ("bias key not ASCII digits", "/v1/chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"\u00b2": 1}},
     400, "invalid_value", "logit_bias"),
    ("bias id", "/v1/chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"60000": 1}}, 400, "invalid_value", "logit_bias"),
    ("bias value", "/v1/chat/completions", {"model": MODEL, "messages": HI, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    ("context exceeded", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 8300}]},
     400, "context_length_exceeded", "messages"),
    ("prompt list", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("bad token ids", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**6]}, 400, "invalid_value", "prompt"),
    ("negative token id", "/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "invalid_value", "prompt"),
    ("suffix", "/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "invalid_value", "suffix"),
    ("body too large", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]},
     413, "request_too_large", None),
    ("unknown URL", "/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "unknown_url", None),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(api: requests.Session, gateway: GatewayThread, name: str, path: str, body: Any,
                                          status: int, code: str | None, param: str | None) -> None:
    if isinstance(body, bytes):
        response = api.post(f"{gateway.url}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        response = api.post(f"{gateway.url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    assert error["param"] == param, error


def test_wrong_method_and_the_gateway_keeps_serving(api: requests.Session, gateway: GatewayThread) -> None:
    response = api.get(f"{gateway.url}/v1/chat/completions", timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_supported"
    before = api.get(f"{gateway.url}/metrics", timeout=10).text
    for _ in range(3):
        assert api.post(f"{gateway.url}/v1/chat/completions", data=b"{", headers={"Content-Type": "application/json"},
                        timeout=10).status_code == 400
    reply = api.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                     json={"model": MODEL, "messages": [{"role": "user", "content": "Say yes."}], "temperature": 0, "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    after = api.get(f"{gateway.url}/metrics", timeout=10).text
    counted = (metric(after, "llmswarm_gateway_requests_total", endpoint="chat_completions", status="bad_request")
               - metric(before, "llmswarm_gateway_requests_total", endpoint="chat_completions", status="bad_request"))
    assert counted == 3


def test_openai_client_raises_bad_request(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=100000)
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, extra_body={"best_of": 3})
    assert caught.value.body["message"] == "Unrecognized request argument supplied: best_of"  # type: ignore[index]


# ---- the swarm unavailable -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gateway_that_cannot_reach_the_swarm_answers_503(smollm2: Any) -> None:
    options = GatewayOptions(swarm=f"http://127.0.0.1:{_free_port()}", port=0, load_retry_seconds=0.2)
    with GatewayThread(options) as running:
        assert requests.get(f"{running.url}/healthz", timeout=10).status_code == 200
        deadline = time.monotonic() + 30
        while (ready := requests.get(f"{running.url}/readyz", timeout=10)).json()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 503
        assert "cannot read the route map" in ready.json()["error"]
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=HI)
        assert caught.value.status_code == 503 and caught.value.code == "swarm_unavailable"
        assert "route map" in caught.value.message
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        metrics = requests.get(f"{running.url}/metrics", timeout=10).text
        assert metric(metrics, "llmswarm_gateway_ready") == 0
        assert metric(metrics, "llmswarm_gateway_requests_total", endpoint="chat_completions", status="unavailable") == 1


@pytest.fixture()
def empty_swarm(smollm2: Any) -> Iterator[str]:
    """A route map for the model with no servers in it: the swarm has lost every server."""
    routes = RouteMap(model=ModelInfo(name=smollm2.name, num_blocks=smollm2.num_blocks, hidden_size=int(smollm2.config.hidden_size)),
                      version=1, servers=[])

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=routes.model_dump_json(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/routes", handler)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    port = _free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_swarm_without_servers_answers_503_before_any_stream_starts(empty_swarm: str) -> None:
    from llmswarm import ClientConfig, DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=empty_swarm, progress=False,
                                                        client_config=ClientConfig(max_retries=1, backoff_base=0.01))
    with GatewayThread(GatewayOptions(swarm=empty_swarm, port=0), model=model) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
        assert caught.value.status_code == 503 and caught.value.code == "swarm_unavailable"
        streamed = requests.post(f"{running.url}/v1/chat/completions", timeout=30,
                                 json={"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True})
        assert streamed.status_code == 503
        assert streamed.headers["Content-Type"].startswith("application/json")
        assert streamed.json()["error"]["type"] == "server_error"


def test_a_body_that_is_not_json_is_refused_before_anything_else(api: requests.Session, gateway: GatewayThread) -> None:
    """A web page can POST text/plain or a form anywhere without a preflight; the API takes JSON only."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = api.post(f"{gateway.url}/v1/chat/completions", data=b'{"model": "x", "messages": []}', headers=headers,
                            timeout=10)
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_media_type"


def test_a_full_gateway_refuses_before_it_tokenizes(api: requests.Session, gateway: GatewayThread,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission comes first: templating and tokenizing a 60 KiB prompt is not spent on a request that is refused."""
    engine = gateway.gateway.engine
    encoded: list[int] = []
    encode_chat = engine.encode_chat
    monkeypatch.setattr(engine, "encode_chat", lambda messages: encoded.append(1) or encode_chat(messages))
    full = engine.options.max_concurrent + engine.options.max_queued
    slots = [engine.admission() for _ in range(full)]
    taken = [slot.__enter__() for slot in slots]
    try:
        response = api.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                            json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 12000}], "max_tokens": 1})
        assert response.status_code == 429, response.text
        assert encoded == []
    finally:
        for slot in slots:
            slot.__exit__(None, None, None)
    assert len(taken) == full
    reply = api.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                     json={"model": MODEL, "messages": [{"role": "user", "content": "Say yes."}], "temperature": 0, "max_tokens": 2})
    assert reply.status_code == 200 and encoded == [1]


def test_a_gateway_without_a_key_answers_only_to_loopback_host_names(smollm2: Any) -> None:
    """DNS rebinding: a page served as evil.example whose name now points at 127.0.0.1 is refused by Host."""
    options = GatewayOptions(swarm=f"http://127.0.0.1:{_free_port()}", port=0, load_retry_seconds=0.2,
                             allowed_hosts=("chat.internal",))
    with GatewayThread(options) as running:
        port = running.url.rsplit(":", 1)[1]
        for host, status in ((f"evil.example:{port}", 403), ("evil.example", 403), (f"localhost:{port}", 503),
                             (f"127.0.0.1:{port}", 503), (f"chat.internal:{port}", 503)):
            response = requests.get(f"{running.url}/v1/models", headers={"Host": host}, timeout=10)
            assert response.status_code == status, (host, response.text)
        assert requests.get(f"{running.url}/healthz", headers={"Host": "evil.example"}, timeout=10).status_code == 200
