"""The gateway's HTTP server: the OpenAI-compatible API, the chat page, probes and metrics.

| endpoint | what |
| --- | --- |
| `POST /v1/chat/completions` | chat completions (OpenAI format), streamed as server-sent events with `"stream": true` |
| `POST /v1/completions` | text completions (OpenAI format), streamed likewise |
| `GET /v1/models`, `GET /v1/models/{id}` | the swarm's model |
| `GET /` | the chat page (static HTML, CSS and JavaScript under `/static/`) |
| `GET /healthz` | 200 while the process runs |
| `GET /readyz` | 200 once the model is loaded and the swarm was reached, 503 before |
| `GET /metrics` | Prometheus metrics (`llmswarm_gateway_*`) |

With a token set, `/v1/*` needs `Authorization: Bearer <token>`. Every refusal is an
OpenAI error object; one request's failure never stops the others.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from llmswarm.gateway.engine import Admission, Engine, Failed, Finished, Job, SamplingParams
from llmswarm.gateway.errors import (
    ApiError,
    RateLimited,
    bad_request,
    forbidden_host,
    from_http_status,
    internal,
    rate_limited,
    unauthorized,
    unsupported_media_type,
)
from llmswarm.gateway.keys import KeyStore
from llmswarm.gateway.metrics import GatewayMetrics
from llmswarm.gateway.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
    parse_request,
)
from llmswarm.gateway.options import GatewayOptions
from llmswarm.gateway.streaming import OUTCOME, ChatChunks, CompletionChunks, stream_job, swarm_info

log = logging.getLogger("llmswarm.gateway")
STATIC = Path(__file__).resolve().parent / "static"
API_KEY = "llmswarm.api_key"  # where a request keeps the name of its API key (from the key file)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """``await Gateway(options).start()`` serves until ``await stop()``; `model` skips loading (tests, notebooks)."""

    def __init__(self, options: GatewayOptions, model: Any = None) -> None:
        options.validate()
        self.options = options
        self.metrics = GatewayMetrics()
        self.engine = Engine(options, self.metrics, model)
        self.keys = KeyStore.load(Path(options.api_keys)) if options.api_keys else None
        self.created = now()
        self.url = ""
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.options.max_body_bytes)
        r = app.router
        r.add_post("/v1/chat/completions", self.chat_completions, name="chat_completions")
        r.add_post("/v1/completions", self.completions, name="completions")
        r.add_get("/v1/models", self.list_models, name="models")
        r.add_get("/v1/models/{model:.+}", self.get_model, name="model")
        r.add_get("/", self.index)
        r.add_static("/static/", STATIC, append_version=False)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.prometheus)
        return app

    async def start(self) -> str:
        """Listen, start loading the model if none was given, and return the gateway's URL."""
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        self.engine.start_loading()
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(self.engine.close)

    # ---- middleware: errors, the API key, metrics -----------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        api = request.path.startswith("/v1/")
        route = request.match_info.route.name if request.match_info.route is not None else None
        endpoint = {"chat_completions": "chat_completions", "completions": "completions", "models": "models",
                    "model": "models"}.get(route or "", "other")
        started = time.monotonic()
        outcome = "ok"
        try:
            if api:
                self._check_host(request)
                self._authorize(request)
                if request.method == "POST" and request.content_type != "application/json":
                    # A web page can send text/plain or a form to any address without asking first (CSRF);
                    # a JSON body needs a CORS preflight, which this API never grants.
                    raise unsupported_media_type(request.headers.get("Content-Type", ""))
            response = await handler(request)
            outcome = request.get(OUTCOME, "ok")
            return response
        except ApiError as error:
            outcome = error.metric
            return self._error_response(error)
        except web.HTTPException as error:
            if not api or error.status < 400:
                outcome = "ok" if error.status < 400 else "not_found"
                raise
            converted = from_http_status(error.status, error.reason if error.status != 404 else request.path)
            outcome = converted.metric
            return self._error_response(converted)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as error:  # answered as a 500; the gateway keeps serving
            log.exception("unexpected error on %s %s", request.method, request.path)
            outcome = "internal"
            return self._error_response(internal(f"internal error: {type(error).__name__}"))
        finally:
            if api:
                self.metrics.requests.labels(endpoint, outcome).inc()
                if API_KEY in request:
                    self.metrics.key_requests.labels(request[API_KEY], outcome).inc()
                self.metrics.request_duration.labels(endpoint).observe(time.monotonic() - started)

    @staticmethod
    def _error_response(error: ApiError) -> web.Response:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        if isinstance(error, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return web.json_response(error.body(), status=error.status, headers=headers)

    def _check_host(self, request: web.Request) -> None:
        """A gateway without an API key on a loopback address answers only to loopback Host names (and
        --allowed-host): a web page that rebinds its own name to 127.0.0.1 cannot drive it."""
        if self.options.token or self.keys is not None or not _loopback(self.options.host) or "*" in self.options.allowed_hosts:
            return
        host = (request.host or "").lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] if host.count(":") == 1 else host
        if not (_loopback(name) or name == "localhost" or name in self.options.allowed_hosts):
            raise forbidden_host(host)

    def _authorize(self, request: web.Request) -> None:
        """The request's API key: the one --token, or a live key of the --api-keys file within its rate limit."""
        token, store = self.options.token, self.keys
        if not token and store is None:
            return
        header = request.headers.get("Authorization", "")
        if not header:
            raise unauthorized("You didn't provide an API key. You need to provide your API key in an Authorization header "
                               "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() == "bearer" and token and hmac.compare_digest(presented.encode(), token.encode()):
            return
        key = store.find(presented) if store is not None and scheme.lower() == "bearer" else None
        if key is None:
            raise unauthorized("Incorrect API key provided.")
        request[API_KEY] = key.name
        wait = store.wait_for(key) if store is not None else 0.0
        if wait > 0:
            raise rate_limited(f"Rate limit reached for key {key.name!r}: {key.requests_per_minute} requests a minute. "
                               f"Retry in {wait:.1f} s.", wait)

    # ---- the API -----------------------------------------------------------------------------------------
    @staticmethod
    async def _json(request: web.Request) -> Any:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge, answered as 413
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, or nested too deeply
            raise bad_request(f"We could not parse the JSON body of your request: {error}", code="invalid_json") from None

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_request(ChatCompletionRequest, await self._json(request))
        model, adapter = await asyncio.to_thread(self.engine.resolve_model, req.model)
        with self.engine.admission() as slot:  # admitted before the work of templating and tokenizing
            prompt = await asyncio.to_thread(self.engine.encode_chat, req.messages)
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            budget = self.engine.completion_budget(len(prompt), req.token_limit(), None, param)
            job = self._submit(slot, req, prompt, budget, request.get(API_KEY), adapter)
        id_, created = new_id("chatcmpl"), now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await stream_job(request, job, ChatChunks(id_, created, model), include_usage, self.options.write_timeout)
        result = await self._result(job)
        body = ChatCompletion(
            id=id_, created=created, model=model,
            choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens), llmswarm=swarm_info(result.chain),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_request(CompletionRequest, await self._json(request))
        model, adapter = await asyncio.to_thread(self.engine.resolve_model, req.model)
        prompt_in = req.prompt_text_or_ids()
        with self.engine.admission() as slot:  # admitted before the work of tokenizing
            prompt = await asyncio.to_thread(self.engine.encode_prompt, prompt_in)
            budget = self.engine.completion_budget(len(prompt), req.max_tokens, 16, "max_tokens")
            job = self._submit(slot, req, prompt, budget, request.get(API_KEY), adapter)
        echo = (prompt_in if isinstance(prompt_in, str) else self.engine.decode(prompt)) if req.echo else ""
        id_, created = new_id("cmpl"), now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = CompletionChunks(id_, created, model, echo)
            return await stream_job(request, job, chunks, include_usage, self.options.write_timeout)
        result = await self._result(job)
        body = Completion(
            id=id_, created=created, model=model,
            choices=[CompletionChoice(text=echo + result.text, finish_reason=result.finish_reason)],
            usage=Usage.of(result.prompt_tokens, result.completion_tokens), llmswarm=swarm_info(result.chain),
        )
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    def _submit(self, slot: Admission, req: ChatCompletionRequest | CompletionRequest, prompt: list[int], budget: int,
                request_key: str | None = None, adapter: str | None = None) -> Job:
        params = SamplingParams(
            max_tokens=budget,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=self.engine.logit_bias(req.logit_bias),
            api_key=request_key,
            adapter=adapter,
        )
        return slot.submit(prompt, params)

    @staticmethod
    async def _result(job: Job) -> Finished:
        """Wait for a job's result; if the client goes away meanwhile (the handler is cancelled), stop it."""
        try:
            while True:
                event = await job.next_event()
                if isinstance(event, Finished):
                    return event
                if isinstance(event, Failed):
                    raise event.error
        finally:
            job.cancel("disconnected")  # a no-op once finished

    def _model_card(self, name: str | None = None) -> ModelCard:
        return ModelCard(id=name or self.engine.model_name, created=self.created)

    async def list_models(self, request: web.Request) -> web.Response:
        """The model, and the model with each adapter published to the swarm (``base:adapter``)."""
        self.engine.check_model(self.engine.model_name)
        try:
            adapters = await asyncio.to_thread(self.engine.published_adapters)
        except ApiError:  # the route map cannot be read just now: the model itself is still served
            adapters = set()
        cards = [self._model_card(), *(self._model_card(f"{self.engine.model_name}:{name}") for name in sorted(adapters))]
        return web.Response(body=ModelList(data=cards).model_dump_json(), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        name, _ = await asyncio.to_thread(self.engine.resolve_model, request.match_info["model"])
        return web.Response(body=self._model_card(name).model_dump_json(), content_type="application/json")

    # ---- page, probes, metrics ---------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.engine.ready:
            return web.json_response({"status": "ready", "model": self.engine.model_name})
        return web.json_response({"status": "loading", "error": self.engine.load_error}, status=503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": self.metrics.content_type})


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
