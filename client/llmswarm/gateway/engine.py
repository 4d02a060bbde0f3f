"""Generation for the gateway: one model object shared by worker threads, off the event loop.

The event loop only validates, admits and writes; each admitted request becomes a
:class:`Job` that a worker thread runs with transformers' ``generate()`` through the
swarm. A job talks back through an asyncio queue (text pieces, then the result or an
error). Sharing is fair: at most ``max_concurrent`` generations run at once and all of
them advance one token per step (the servers batch their steps together, and the
model coalesces their LM-head passes); the rest wait in arrival order, up to
``max_queued``, and beyond that requests are refused with 429.

A job stops early when its cancel flag is set (the HTTP client vanished, stopped
reading, or pressed stop): a stopping criterion checks the flag after every token, so
``generate()`` returns and its inference session, with the caches it holds on the
servers, is closed at once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from llmswarm.gateway.errors import ApiError, bad_request, internal, model_not_found, overloaded, unavailable
from llmswarm.gateway.metrics import GatewayMetrics
from llmswarm.gateway.openai_schema import ChatMessage, FinishReason
from llmswarm.gateway.options import GatewayOptions
from llmswarm.gateway.sampling import OpenAIPenalties, SeededSampler, request_generator
from llmswarm.gateway.text import TextTracker
from llmswarm_core.lora import ADAPTER_NAME

log = logging.getLogger("llmswarm.gateway")


PUBLISHED_SECONDS = 5.0  # how long the gateway trusts its read of the published adapters


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    api_key: str | None = None  # the name of the API key that asked (usage metrics)
    adapter: str | None = None  # a published LoRA adapter to generate with (`model: "base:adapter"`)


@dataclass(frozen=True)
class Delta:
    text: str
    chain: list[tuple[str, int, int]] | None = None  # on the first piece: the servers answering


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    chain: list[tuple[str, int, int]]  # (server id, start, end) of the servers that answered


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Finished | Failed


class Job:
    """One admitted generation: its inputs, its cancel flag, and the queue its events arrive on."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 metrics: GatewayMetrics) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.admitted = time.monotonic()
        self.cancelled = threading.Event()
        self.done = False
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._metrics = metrics

    def post(self, event: Event) -> None:
        """Hand an event to the event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancelled.set()

    async def next_event(self) -> Event:
        event = await self._events.get()
        if isinstance(event, Finished | Failed):
            self.done = True
        return event

    def cancel(self, reason: str) -> None:
        """Stop the generation after its current step (a no-op once it has finished)."""
        if not self.done and not self.cancelled.is_set():
            self.cancelled.set()
            self._metrics.cancelled.labels(reason).inc()


class _Watcher(StoppingCriteria):
    """Runs after every generated token: streams its text, and stops at a stop sequence or when cancelled."""

    def __init__(self, job: Job, tracker: TextTracker, model: Any, metrics: GatewayMetrics) -> None:
        self.job = job
        self.tracker = tracker
        self.model = model
        self.metrics = metrics
        self.prompt_length = len(job.prompt_ids)
        self.generated: list[int] = []
        self.chain: list[tuple[str, int, int]] = []
        self._last = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[0, self.prompt_length + len(self.generated):].tolist()
        now = time.monotonic()
        first = not self.generated
        if first:
            self.metrics.time_to_first_token.observe(now - self.job.admitted)
        else:
            self.metrics.inter_token_latency.observe(now - self._last)
        self._last = now
        self.generated.extend(new)
        # The generation's session: the decode loop's (decode_loop.py) passes it; else this thread's, opened by generate().
        session = kwargs.get("session") or self.model.active_session
        if session is not None:
            self.chain = list(session.chain)
        piece = self.tracker.add(new)
        if piece or first:
            self.job.post(Delta(piece, self.chain if first else None))
        stop = self.job.cancelled.is_set() or self.tracker.stopped
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)  # type: ignore[return-value]


class Admission:
    """A request's place in the gateway, taken before its prompt is tokenized; :meth:`submit` uses it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.job: Job | None = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        if self.job is not None:
            raise RuntimeError("an admission starts one job")
        self.job = Job(prompt_ids, params, asyncio.get_running_loop(), self._engine.metrics)
        self._engine.start(self.job)
        return self.job


class Engine:
    def __init__(self, options: GatewayOptions, metrics: GatewayMetrics, model: Any = None) -> None:
        self.options = options
        self.metrics = metrics
        self.model: Any = None
        self.model_name = options.served_model_name or ""
        self.aliases: set[str] = set()
        self.load_error: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=options.max_concurrent, thread_name_prefix="generate")
        self._lock = threading.Lock()
        self._outstanding = 0  # admitted and not finished (queued + running)
        self._closing = threading.Event()
        self._jobs: set[Job] = set()
        self._views: dict[str, Any] = {}  # adapter name -> the model generating with it (shares every weight)
        self._published: tuple[float, set[str]] = (float("-inf"), set())  # when read, the published adapters
        if model is not None:
            self._use(model)

    # ---- the model ---------------------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread | None:
        """Load the model in the background, retrying while the swarm is unreachable."""
        if self.model is not None:
            return None
        thread = threading.Thread(target=self._load, name="gateway-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        from llmswarm.config import ClientConfig
        from llmswarm.errors import SwarmError
        from llmswarm.model import DistributedModelForCausalLM

        while not self._closing.is_set():
            try:
                model = DistributedModelForCausalLM.from_pretrained(
                    self.options.model, swarm=self.options.swarm, wire_dtype=self.options.wire_dtype,
                    client_config=ClientConfig(token=self.options.swarm_token), progress=False,
                )
                self._use(model)
                log.info("gateway ready: %s from %s", self.model_name, self.options.swarm)
                return
            except SwarmError as error:
                self.load_error = str(error)
                log.warning("cannot reach the swarm yet (%s); retrying in %.0f s", error, self.options.load_retry_seconds)
                self._closing.wait(self.options.load_retry_seconds)
            except Exception as error:  # a model SPEC that cannot load: report, do not retry
                self.load_error = f"{type(error).__name__}: {error}"
                log.exception("cannot load the model %s", self.options.model)
                return

    def _use(self, model: Any) -> None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer: the gateway needs one for chat templates and text")
        routes = model.client.routes()
        swarm_name = routes.model.name if routes.model is not None else self.options.model
        self.model_name = self.options.served_model_name or swarm_name
        self.aliases = {self.model_name, swarm_name, self.options.model}
        self.context_length = self.options.context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.model = model
        self.load_error = None
        self.metrics.ready.set(1)

    @property
    def ready(self) -> bool:
        return self.model is not None

    def check_model(self, name: str) -> str:
        """The served name for a request's `model`, or the right refusal."""
        if self.model is None:
            raise unavailable(f"The gateway has not reached the swarm yet: {self.load_error or 'loading the model'}")
        if name not in self.aliases:
            raise model_not_found(name)
        return self.model_name

    def resolve_model(self, name: str) -> tuple[str, str | None]:
        """A request's `model`: the base model (served name, None), or ``base:adapter`` with an adapter published
        to the swarm (``served:adapter``, the adapter); anything else is refused as a model that does not exist."""
        base, colon, adapter = name.partition(":")
        if not colon:
            return self.check_model(name), None
        self.check_model(base)
        if not re.fullmatch(ADAPTER_NAME, adapter) or adapter not in self.published_adapters():
            raise model_not_found(name)
        return f"{self.model_name}:{adapter}", adapter

    def published_adapters(self) -> set[str]:
        """The names of the swarm's published adapters, read again at most every PUBLISHED_SECONDS."""
        from llmswarm.errors import SwarmError
        from llmswarm.publish import published

        read_at, names = self._published
        if time.monotonic() - read_at >= PUBLISHED_SECONDS:
            try:
                names = {entry["name"] for entry in published(self.model.client)}
            except SwarmError as error:
                raise unavailable(f"The swarm's adapters cannot be read: {error}") from None
            self._published = (time.monotonic(), names)
        return names

    def _model_for(self, adapter: str | None) -> Any:
        """The model generating with `adapter` (its sessions name it): a shallow copy sharing every weight."""
        if adapter is None:
            return self.model
        with self._lock:
            if adapter not in self._views:
                view = copy.copy(self.model)
                view.adapter = adapter
                self._views[adapter] = view
            return self._views[adapter]

    # ---- prompts -----------------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The model's chat template applied to the conversation; a final assistant message is continued."""
        continuing = messages[-1].role == "assistant"
        try:
            encoded = self.model.tokenizer.apply_chat_template(
                [m.for_template() for m in messages], add_generation_prompt=not continuing,
                continue_final_message=continuing, tokenize=True,
            )
        except Exception as error:  # a template that refuses this conversation (jinja raises anything)
            raise bad_request(f"The model's chat template cannot format these messages: {error}", param="messages") from error
        ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
        return [int(i) for i in ids]

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = [int(i) for i in self.model.tokenizer(prompt)["input_ids"]]
        else:
            bad = [i for i in prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise bad_request(f"Invalid token ids in 'prompt': {bad[:5]} (the vocabulary has {self.vocab_size} tokens)",
                                  param="prompt", code="invalid_value")
            ids = list(prompt)
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt", code="invalid_value")
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.model.tokenizer.decode(ids, skip_special_tokens=True))

    def completion_budget(self, prompt_tokens: int, requested: int | None, default: int | None, param: str) -> int:
        """How many tokens to generate, or the refusal OpenAI gives for too many tokens."""
        cap, context = self.options.max_tokens, self.context_length
        if requested is not None and requested > cap:
            raise bad_request(f"{param} is too large: {requested}. This gateway allows at most {cap} completion tokens.",
                              param=param, code="invalid_value")
        budget = requested if requested is not None else min(default or cap, cap, max(context - prompt_tokens, 1))
        if prompt_tokens + budget > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + budget} "
                f"tokens ({prompt_tokens} in the messages, {budget} in the completion). Please reduce the length of the "
                "messages or completion.", param="messages", code="context_length_exceeded",
            )
        return budget

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out = {int(k): v for k, v in (bias or {}).items()}
        bad = [k for k in out if k >= self.vocab_size]
        if bad:
            raise bad_request(f"Invalid token ids in 'logit_bias': {bad[:5]} (the vocabulary has {self.vocab_size} tokens)",
                              param="logit_bias", code="invalid_value")
        return out

    # ---- jobs --------------------------------------------------------------------------------------------
    @contextmanager
    def admission(self) -> Iterator[Admission]:
        """Admit a request before any work is spent on it (tokenizing, templating), or refuse it when the
        gateway is full; the slot is given back unless the request was submitted within the block."""
        if self.model is None:
            raise unavailable("The gateway has not reached the swarm yet.")
        with self._lock:
            if self._closing.is_set():
                raise unavailable("The gateway is shutting down.")
            if self._outstanding >= self.options.max_concurrent + self.options.max_queued:
                raise overloaded(f"The gateway is busy: {self._outstanding} requests are running or waiting. Retry shortly.")
            self._outstanding += 1
        slot = Admission(self)
        try:
            yield slot
        finally:
            if slot.job is None:
                with self._lock:
                    self._outstanding -= 1

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Admit and start a generation at once (see :meth:`admission`); its events arrive on the job."""
        with self.admission() as slot:
            return slot.submit(prompt_ids, params)

    def start(self, job: Job) -> None:
        """Queue an admitted job for a worker thread."""
        with self._lock:
            self._jobs.add(job)
        self.metrics.queued.inc()
        self._pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        self.metrics.queued.dec()
        self.metrics.active.inc()
        try:
            if job.cancelled.is_set():  # its client left while it waited
                job.post(Failed(unavailable("cancelled")))
                return
            job.post(self._generate(job))
        except Exception as error:  # one request's failure must not take the worker down
            log.exception("generation failed")
            job.post(Failed(internal(f"generation failed: {type(error).__name__}: {error}")))
        finally:
            self.metrics.active.dec()
            with self._lock:
                self._outstanding -= 1
                self._jobs.discard(job)

    def _generate(self, job: Job) -> Finished | Failed:
        from llmswarm.errors import SwarmError
        from llmswarm_core.wire import ProtocolError

        params = job.params
        model = self._model_for(params.adapter)
        prompt_length = len(job.prompt_ids)
        tracker = TextTracker(self.decode, params.stop)
        watcher = _Watcher(job, tracker, model, self.metrics)
        processors: list[Any] = []
        if params.presence_penalty or params.frequency_penalty or params.logit_bias:
            processors.append(OpenAIPenalties(prompt_length, params.presence_penalty, params.frequency_penalty, params.logit_bias))
        if params.temperature > 0:
            processors.append(SeededSampler(params.temperature, params.top_p, request_generator(params.seed)))
        config: GenerationConfig = copy.deepcopy(model.generation_config)
        config.do_sample = False  # sampling, if any, is SeededSampler's (a private generator per request)
        config.temperature = config.top_p = config.top_k = None  # the model's sampling defaults do not apply
        config.max_new_tokens = params.max_tokens
        ids = torch.tensor([job.prompt_ids], dtype=torch.long)
        try:
            model.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids),
                           logits_processor=LogitsProcessorList(processors), stopping_criteria=StoppingCriteriaList([watcher]))
        except SwarmError as error:
            return Failed(unavailable(f"The swarm could not serve the request: {error}"))
        except ProtocolError as error:
            if error.code in ("too_large", "bad_request"):
                return Failed(bad_request(f"The swarm refused the request: {error}", code="swarm_refused"))
            return Failed(unavailable(f"The swarm could not serve the request: {error}"))
        generated = watcher.generated
        tail = tracker.finish()
        if tail:
            job.post(Delta(tail))
        if tracker.stopped or (generated and generated[-1] in self.eos_ids):
            reason: FinishReason = "stop"
        elif len(generated) >= params.max_tokens:
            reason = "length"
        else:
            reason = "stop"
        self.metrics.count_tokens(job.params.api_key, prompt_length, len(generated))
        return Finished(tracker.text, reason, prompt_length, len(generated), watcher.chain)

    def close(self) -> None:
        """Cancel every job, let the workers finish their current step, and stop."""
        self._closing.set()
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
