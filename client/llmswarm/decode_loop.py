"""One loop that decodes every concurrent generation of a client process together.

Local batched ``generate()`` pays for a token once per batch: one embedding lookup, one
LM-head product, one sampling step. Threads that each run transformers' ``generate()``
pay per thread: its per-token Python work (input preparation, logits processors, stopping
criteria, cache bookkeeping) runs once per session under one interpreter lock. Measured
with 16 sessions on the 2-core machine (bench/concurrency.py's setting), that work and the
LM head took 50 of the 215 ms of each token, while the servers sat idle.

:class:`DecodeLoop` takes plain generations (:class:`DecodeParams`: greedy or sampling with
temperature, top-k, top-p, repetition penalty, minimum and maximum new tokens, EOS tokens)
from any number of threads and runs them in rounds, continuous-batching style: each round,
new sessions send their prompts and running ones their last token, all through the swarm
together (step_engine.py: one pass per server for all of them), then one LM-head product
over every session's last hidden state, and one argmax over the greedy rows. Each session
keeps its own server-side caches, its own length and its own logits processors
(transformers' own classes, in ``generate()``'s order), so its tokens are those
``generate()`` gives it alone; sampled rows draw from torch's global generator in turn, as
``generate()`` does, so a lone seeded generation draws what ``generate()`` would.

``DistributedModelForCausalLM.generate()`` hands such generations to the loop (batch of one,
no streamer, stopping criteria or other options: :meth:`DecodeParams.from_generate`);
everything else runs transformers' ``generate()`` as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmswarm.inference import InferenceSession, SessionStep, step_together
from llmswarm_core.threads import torch_threads

log = logging.getLogger("llmswarm.client")

# GenerationConfig fields the loop reproduces; a config that sets any other field away from its default runs
# transformers' generate() instead.
_SUPPORTED = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "transformers_version",
    "_from_model_config", "output_attentions", "output_hidden_states", "return_dict_in_generate", "num_beams",
    "num_return_sequences", "cache_implementation",
}
# generate() keyword arguments that are not generation settings and that the loop accepts.
_PLAIN_KWARGS = {"input_ids", "attention_mask", "pad_token_id", "logits_processor", "stopping_criteria"}


@dataclass(frozen=True)
class DecodeParams:
    """What one generation asks for: `processors` are applied in order to its float32 scores; after each token,
    each of `stopping` is called as generate() calls stopping criteria (the ids so far, then scores=None), with
    the generation's InferenceSession as ``session=``, and any True ends the generation."""

    max_new_tokens: int
    eos_token_ids: frozenset[int]
    do_sample: bool
    processors: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = ()
    stopping: tuple[Callable[..., torch.Tensor], ...] = ()

    @staticmethod
    def from_generate(config: GenerationConfig, kwargs: dict[str, Any], prompt_length: int) -> DecodeParams | None:
        """The loop's params for ``generate(config, **kwargs)`` on a prompt of `prompt_length` tokens, or None where
        it asks for anything the loop does not reproduce (then transformers' generate() runs it)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # streamer=None and the like: not given
        config = GenerationConfig(**config.to_dict())
        try:
            unused = config.update(**{k: v for k, v in kwargs.items() if k not in _PLAIN_KWARGS})
        except ValueError:  # an invalid setting: generate() gives its own error
            return None
        if unused or set(kwargs) - _PLAIN_KWARGS - set(config.to_dict()):
            return None
        if set(config.to_diff_dict()) - _SUPPORTED:
            return None
        if (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1 or config.return_dict_in_generate:
            return None
        if config.cache_implementation is not None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool((mask == 1).all()):
            return None
        if config.max_new_tokens is not None:
            max_new = int(config.max_new_tokens)
        elif config.max_length is not None:
            max_new = int(config.max_length) - prompt_length
        else:
            return None
        if max_new < 1:
            return None
        eos = config.eos_token_id
        eos_ids = frozenset([] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        processors = _processors(config, prompt_length, eos_ids, list(kwargs.get("logits_processor") or []))
        if processors is None:
            return None
        return DecodeParams(max_new, eos_ids, bool(config.do_sample), tuple(processors),
                            tuple(kwargs.get("stopping_criteria") or []))


def _processors(config: GenerationConfig, prompt_length: int, eos_ids: frozenset[int],
                custom: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> LogitsProcessorList | None:
    """transformers' processors for these settings, in the order generate() applies them (its
    ``_get_logits_processor``), for the fields in _SUPPORTED: the caller's own (`custom`) after the built-in
    ones and before the sampling warpers."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    if config.min_length is not None and config.min_length > 0 and eos_ids:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos))
    if config.min_new_tokens is not None and config.min_new_tokens > 0 and eos_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos))
    if any(type(mine) is type(theirs) for mine in custom for theirs in processors):
        return None  # generate() lets a custom processor replace its own of the same type: that runs there
    processors.extend(custom)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            if config.temperature <= 0:
                return None
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
    return processors


class LoopModel(Protocol):
    """What the loop needs of the model: its local parts and a way to open sessions."""

    def open_loop_session(self, max_length: int, adapter: str | None) -> InferenceSession: ...

    def embed_for_loop(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [rows, tokens] -> hidden, block input

    def logits_for_loop(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [rows, hidden] -> [rows, vocab]

    @property
    def decode_threads(self) -> int: ...


@dataclass(eq=False)
class _Generation:
    prompt: torch.Tensor  # [1, prompt tokens]
    params: DecodeParams
    adapter: str | None = None  # a LoRA adapter the servers host (generations with different ones share rounds)
    tokens: list[int] = field(default_factory=list)
    session: InferenceSession | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False

    def ids(self) -> torch.Tensor:
        """The prompt and the tokens so far, [1, length] (what logits processors read)."""
        if not self.tokens:
            return self.prompt
        return torch.cat([self.prompt, torch.tensor([self.tokens], dtype=self.prompt.dtype)], dim=1)

    def stopped(self) -> bool:
        """Whether a stopping criterion ends the generation here (each is called after every token)."""
        if not self.params.stopping:
            return False
        ids = self.ids()
        return any(bool(criterion(ids, None, session=self.session)[0]) for criterion in self.params.stopping)

    def finished(self) -> bool:
        return len(self.tokens) >= self.params.max_new_tokens or (
            bool(self.tokens) and self.tokens[-1] in self.params.eos_token_ids)


class DecodeLoop:
    """Runs the generations handed to :meth:`generate` from any thread together, one round per token."""

    def __init__(self, model: LoopModel) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._pending: list[_Generation] = []  # handed in, not yet in a round
        self._active: list[_Generation] = []
        self._thread: threading.Thread | None = None
        self.rounds = 0  # rounds run (tests and diagnostics)
        self.rows = 0  # generations stepped, summed over rounds

    def generate(self, prompt: torch.Tensor, params: DecodeParams, adapter: str | None = None) -> torch.Tensor:
        """The prompt [1, tokens] followed by its new tokens, as generate() returns them; `adapter`: a LoRA adapter
        the servers host, for this generation."""
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError("the decode loop takes one prompt of shape [1, tokens]")
        generation = _Generation(prompt.detach().cpu().to(torch.long), params, adapter)
        with self._lock:
            self._pending.append(generation)
            if self._thread is None:
                # Not a daemon, and gone as soon as the loop is idle: the interpreter never exits under a thread
                # that may be in torch (a daemon's torch state torn down at exit aborted one client in ~25).
                self._thread = threading.Thread(target=self._run, name="llmswarm-decode-loop")
                self._thread.start()
        try:
            generation.done.wait()
        except BaseException:
            generation.cancelled = True  # the loop drops it and closes its session at the next round
            raise
        if generation.error is not None:
            raise generation.error
        new = torch.tensor([generation.tokens], dtype=torch.long)
        return torch.cat([generation.prompt, new], dim=1).to(prompt.device)

    # ---- the loop thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad(), torch_threads(self.model.decode_threads):  # grad mode is per thread
            while True:
                with self._lock:
                    if not self._active and not self._pending:
                        self._thread = None  # the next generation starts a new one
                        return
                    self._active.extend(self._pending)
                    self._pending = []
                    active = list(self._active)
                try:
                    still = self._round(active)
                except BaseException as error:  # a defect here must not hang the callers
                    log.exception("decode loop round failed")
                    for generation in active:
                        self._finish(generation, error)
                    still = []
                with self._lock:
                    self._active = still

    def _round(self, active: list[_Generation]) -> list[_Generation]:
        """One token for each generation; returns those still running."""
        running: list[_Generation] = []
        for generation in active:
            if generation.cancelled:
                self._finish(generation)
                continue
            if generation.session is None:
                try:
                    generation.session = self.model.open_loop_session(
                        generation.prompt.shape[1] + generation.params.max_new_tokens, generation.adapter)
                except Exception as error:  # noqa: BLE001 - that generation's own failure
                    self._finish(generation, error)
                    continue
            running.append(generation)
        if not running:
            return []
        steps = [self._step(g) for g in running]
        outputs = step_together(steps)
        with self._lock:
            self.rounds += 1
            self.rows += len(running)
        stepped: list[tuple[_Generation, torch.Tensor]] = []
        for generation, output in zip(running, outputs, strict=True):
            if isinstance(output, BaseException):
                self._finish(generation, output)
            else:
                stepped.append((generation, output[:, -1]))
        if not stepped:
            return []
        logits = self.model.logits_for_loop(torch.cat([hidden for _, hidden in stepped])).float()
        tokens = _next_tokens([g for g, _ in stepped], logits)
        still: list[_Generation] = []
        for (generation, _), token in zip(stepped, tokens, strict=True):
            generation.tokens.append(token)
            if generation.stopped() or generation.finished():
                self._finish(generation)
            else:
                still.append(generation)
        return still

    def _step(self, generation: _Generation) -> SessionStep:
        assert generation.session is not None
        ids = generation.prompt if not generation.tokens else torch.tensor([[generation.tokens[-1]]])
        past = generation.session.position
        positions = torch.arange(past, past + ids.shape[1]).unsqueeze(0)
        return SessionStep(generation.session, self.model.embed_for_loop(ids), None, positions)

    @staticmethod
    def _finish(generation: _Generation, error: BaseException | None = None) -> None:
        if generation.session is not None:
            try:
                generation.session.close()
            except Exception:  # closing is best effort; the servers expire idle sessions
                log.debug("closing a finished session failed", exc_info=True)
        generation.error = error
        generation.done.set()


def _next_tokens(generations: Sequence[_Generation], logits: torch.Tensor) -> list[int]:
    """Each generation's next token from its row of `logits` [rows, vocab]: plain greedy rows in one argmax, the
    others through their own processors (and a draw from torch's generator, in order, where they sample)."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, generation in enumerate(generations):
        params = generation.params
        if not params.processors and not params.do_sample:
            continue
        scores = logits[row:row + 1].clone()
        ids = generation.ids()
        for processor in params.processors:
            scores = processor(ids, scores)
        if params.do_sample:
            tokens[row] = int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[0, 0])
        else:
            tokens[row] = int(scores.argmax(dim=-1)[0])
    return tokens
