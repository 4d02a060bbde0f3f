"""A causal LM whose blocks run in the swarm: embeddings, final norm and LM head stay local.

``DistributedModelForCausalLM`` is a transformers ``PreTrainedModel`` with
``GenerationMixin``: ``generate()`` is transformers' own (greedy, sampling, repetition
penalty, stop strings, streamers, padded batches). The attention cache it carries is a
:class:`RemoteCache`, a handle on an inference session whose caches live on the servers.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from llmswarm.autograd import remote_blocks
from llmswarm.coalesce import Coalescer, stacked, trailing_shape
from llmswarm.config import ClientConfig
from llmswarm.decode_loop import DecodeLoop, DecodeParams
from llmswarm.errors import SwarmError
from llmswarm.inference import InferenceSession, SessionStep, step_together
from llmswarm.lora import LoraWeights, read_config, read_weights
from llmswarm.publish import publish, upload_body
from llmswarm.sequence_manager import SwarmClient
from llmswarm.stateless import RemoteSequential
from llmswarm_core.arch import architecture_of
from llmswarm_core.security import token_from_env
from llmswarm_core.source import ModelDir, load_state, resolve
from llmswarm_core.threads import available_cores, torch_threads


class RemoteCache(Cache):
    """What generate() sees as the KV cache: the server-side caches of one inference session."""

    def __init__(self, session: InferenceSession, prefix: int = 0) -> None:
        super().__init__(layers=[])
        self.session = session
        self.prefix = prefix  # prompt-tuning tokens the servers hold before the user's tokens

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return max(0, self.session.position - self.prefix)

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported through the swarm")


def _client_part(source: ModelDir, dtype: torch.dtype) -> PreTrainedModel:
    """The model's CausalLM with zero blocks, holding the source's non-block weights."""
    data = source.config.to_dict()
    data["num_hidden_layers"] = 0
    if data.get("layer_types") is not None:
        data["layer_types"] = []
    config = type(source.config).from_dict(data)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    local, info = load_state(model_class, config, source.client_state(dtype=dtype), dtype)
    missing = sorted(k for k in info["missing_keys"] if not k.endswith("inv_freq"))
    if missing or info["unexpected_keys"]:
        raise ValueError(f"client weights do not match the architecture: missing {missing}, unexpected {sorted(info['unexpected_keys'])}")
    return local.eval().requires_grad_(False)


TUNING_MODES = ("ptune", "deep_ptune", "lora")
PROMPT_MODES = ("ptune", "deep_ptune")


def _check_tuning(tuning_mode: str | None, pre_seq_len: int, adapter: str | None, lora_config: Any) -> None:
    if tuning_mode is not None and tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, not {tuning_mode!r}")
    if tuning_mode in PROMPT_MODES and pre_seq_len < 1:
        raise ValueError(f"tuning_mode={tuning_mode!r} needs pre_seq_len >= 1")
    if (tuning_mode == "lora") != (lora_config is not None):
        raise ValueError('tuning_mode="lora" goes with lora_config=peft.LoraConfig(...) (or adapter=DIR), and only it')
    if tuning_mode == "lora" and adapter is not None:
        raise ValueError(f"the client's own LoRA weights and the servers' adapter {adapter!r} cannot be combined")


STEP_WAIT = 0.04  # seconds the first of several generating threads waits for the others' steps (briefer while
# one of them is stalled: coalesce.py)


class _DistributedModel(PreTrainedModel):
    """What every swarm-backed model holds locally: embeddings, final norm, optional trainable prompts or LoRA."""

    def __init__(self, config: PretrainedConfig, local: PreTrainedModel, client: SwarmClient, tokenizer: Any = None,
                 tuning_mode: str | None = None, pre_seq_len: int = 0, adapter: str | None = None,
                 lora_config: Any = None) -> None:
        super().__init__(config)
        _check_tuning(tuning_mode, pre_seq_len, adapter, lora_config)
        self.local = local
        self.arch = architecture_of(config)
        self.client = client
        # Client-owned LoRA weights (tuning_mode="lora"): sent with every request, trained here (lora.py).
        self.lora = LoraWeights(config, self.arch, lora_config, local.dtype) if tuning_mode == "lora" else None
        self.remote = RemoteSequential(client, config.num_hidden_layers, adapter,
                                       None if self.lora is None else self.lora.spec)
        self.adapter = adapter
        self.source_name: str | None = None  # the model's name where it came from (from_pretrained's source)
        self.tokenizer = tokenizer
        self.generation_config = local.generation_config
        self._local_state = threading.local()  # the active session is per thread: one model serves many users
        base = getattr(local, self.arch.base)
        self.embed: nn.Module = getattr(base, self.arch.embed)
        self.embed_norm: nn.Module = getattr(base, self.arch.embed_norm) if self.arch.embed_norm else nn.Identity()
        self.final_norm: nn.Module = getattr(base, self.arch.final_norm)
        self.tuning_mode = tuning_mode
        self.pre_seq_len = pre_seq_len if tuning_mode in PROMPT_MODES else 0
        hidden = int(config.hidden_size)
        if tuning_mode in PROMPT_MODES:
            # Trainable prompts live on the client, as in Petals: shallow ones are prepended to the
            # input embeddings; deep ones (one per block) are added by each server to its input.
            self.prompt_embeddings = nn.Embedding(pre_seq_len, hidden, dtype=local.dtype)
            nn.init.normal_(self.prompt_embeddings.weight, std=float(getattr(config, "initializer_range", 0.02)))
        if tuning_mode == "deep_ptune":
            self.intermediate_prompt_embeddings = nn.Embedding(pre_seq_len, config.num_hidden_layers * hidden, dtype=local.dtype)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        spec: str,
        swarm: str,
        dtype: torch.dtype = torch.float32,
        wire_dtype: str | None = None,
        client_config: ClientConfig | None = None,
        progress: bool = True,
        token: str | None = None,
        tls_ca: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        device: str | torch.device | None = None,
        lora_config: Any = None,
        adapter: str | os.PathLike[str] | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Load the local part of `spec` and connect to the swarm's route map at `swarm`.

        `wire_dtype` ("float32", "float16", "bfloat16"; default: `client_config`'s) is how hidden states
        travel. `token` is the swarm token (default: $LLMSWARM_TOKEN); `tls_ca` a CA bundle to verify
        https servers with. `tuning_mode` ("ptune" or "deep_ptune") with `pre_seq_len` adds
        trainable prompts; `tuning_mode="lora"` with `lora_config` (a peft.LoraConfig) adds trainable LoRA
        weights that the client owns (PEFT's initialization), and `adapter` (a PEFT adapter directory, as
        save_pretrained writes it) starts them from saved ones; `active_adapter` selects a LoRA adapter
        the servers host. `device`
        puts the local parts (embeddings, final norm, LM head, prompts) there, e.g. "cuda"
        (``model.to(device)`` does the same); hidden states cross to the CPU only for the wire.
        """
        source = resolve(spec, progress=progress)
        if adapter is not None:
            if lora_config is not None or tuning_mode not in (None, "lora"):
                raise ValueError("adapter= resumes LoRA training from a saved adapter: give no lora_config or other "
                                 "tuning_mode with it")
            tuning_mode, lora_config = "lora", read_config(adapter)
        config = client_config or ClientConfig()
        config = dataclasses.replace(config, wire_dtype=wire_dtype or config.wire_dtype,
                                     token=token_from_env(token or config.token), tls_ca=tls_ca or config.tls_ca)
        client = SwarmClient(swarm, config)
        routes = client.routes()
        if routes.model is not None and routes.model.num_blocks != source.num_blocks:
            raise SwarmError(
                f"the swarm serves {routes.model.name} with {routes.model.num_blocks} blocks, "
                f"but {spec} has {source.num_blocks}"
            )
        local = _client_part(source, dtype)
        gen_file = source.path / "generation_config.json"
        if gen_file.is_file():
            local.generation_config = GenerationConfig.from_pretrained(source.path)
        try:
            tokenizer = source.tokenizer()
        except (OSError, ValueError, TypeError):  # a model directory without a tokenizer (tests' tiny models)
            tokenizer = None
        model = cls(source.config, local, client, tokenizer=tokenizer, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len,
                    adapter=active_adapter, lora_config=lora_config, **model_kwargs)
        model.source_name = source.name
        if adapter is not None and model.lora is not None:
            model.lora.load_peft_state_dict(read_weights(adapter, model.lora.block_path))
        if device is not None:
            model.to(device)
        return model.eval()

    def embed_inputs(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.embed(input_ids)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:  # type: ignore[override]
        """With tuning_mode="lora": a standard PEFT adapter directory of the client's LoRA weights."""
        if self.lora is None:
            super().save_pretrained(save_directory, **kwargs)
            return
        self.lora.save(save_directory, base_model=self.source_name or self.config.name_or_path)

    def publish_adapter(self, name: str, replace: bool = False, publisher: str | None = None) -> dict[str, Any]:
        """Publish the client's LoRA weights to the swarm's route map as adapter `name` (publish.py): any client
        then uses it with ``from_pretrained(..., active_adapter=name)``. Returns the route map's entry for it."""
        if self.lora is None:
            raise ValueError('the model has no LoRA weights to publish (tuning_mode="lora")')
        body = upload_body(self.lora.peft_state_dict(), self.lora.spec, self.source_name or self.config.name_or_path)
        return publish(self.client, name, body, replace, publisher)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The client's LoRA weights under PEFT's key names (for ``peft.set_peft_model_state_dict``)."""
        if self.lora is None:
            raise ValueError('the model has no LoRA weights (tuning_mode="lora")')
        return self.lora.peft_state_dict()

    def prompts(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Shallow prompts [batch, prefix, hidden] and deep prompts [blocks, batch, prefix, hidden] (or None)."""
        if not self.pre_seq_len:
            return None, None
        shallow = self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
        if self.tuning_mode != "deep_ptune":
            return shallow, None
        deep = self.intermediate_prompt_embeddings.weight.view(self.pre_seq_len, self.config.num_hidden_layers, -1)
        return shallow, deep.permute(1, 0, 2).unsqueeze(1).expand(-1, batch, -1, -1)

    def run_blocks(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, session: InferenceSession | None = None,
                   past: int = 0) -> torch.Tensor:
        """Embeddings in, hidden states after the last block out (prompts added and removed here).

        With prompts, the prefix takes positions 0..prefix-1 and is always attended; the tokens'
        own positions shift by the prefix length.
        """
        batch, new = inputs_embeds.shape[:2]
        prefix = self.pre_seq_len
        device = inputs_embeds.device  # the client's own parts may run on a GPU; the wire takes CPU tensors
        if attention_mask is not None:
            attention_mask = attention_mask.cpu()
        if position_ids is None:
            position_ids = torch.arange(past, past + new).unsqueeze(0).expand(batch, -1)
        position_ids = position_ids.cpu()
        hidden = inputs_embeds
        shallow, deep = self.prompts(batch)
        first_step = session is None or session.position == 0
        if prefix:
            position_ids = position_ids + prefix
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
            if first_step:
                assert shallow is not None
                hidden = torch.cat([shallow.to(hidden.dtype), hidden], dim=1)
                position_ids = torch.cat([torch.arange(prefix).unsqueeze(0).expand(batch, -1), position_ids], dim=1)
        hidden = self.embed_norm(hidden).cpu()  # .cpu() and .to(device) are differentiable: gradients come back
        if session is not None:
            if deep is not None and first_step:  # deep prompts shape the first step's cached prefix, alone
                output = session.step(hidden, attention_mask, position_ids, prompts=deep.detach().cpu()).to(device)
            else:
                output = self._session_step(session, hidden, attention_mask, position_ids).to(device)
            return output[:, prefix:] if prefix and first_step else output
        lora = None if self.lora is None else self.lora.packed().cpu()
        if torch.is_grad_enabled() or deep is not None or lora is not None:
            output = remote_blocks(self.remote, hidden, attention_mask, position_ids, None if deep is None else deep.cpu(),
                                   lora)
        else:
            output = self.remote.forward(hidden, attention_mask, position_ids)
        output = output.to(device)
        return output[:, prefix:] if prefix else output

    def _session_step(self, session: InferenceSession, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> torch.Tensor:
        return session.step(hidden, attention_mask, position_ids)


class DistributedModelForCausalLM(_DistributedModel, GenerationMixin):
    """A causal LM served by a swarm. Build it with :meth:`from_pretrained`."""

    _supports_cache_class = True

    def __init__(self, config: PretrainedConfig, local: PreTrainedModel, client: SwarmClient, tokenizer: Any = None,
                 tuning_mode: str | None = None, pre_seq_len: int = 0, adapter: str | None = None,
                 lora_config: Any = None) -> None:
        super().__init__(config, local, client, tokenizer, tuning_mode, pre_seq_len, adapter, lora_config)
        self.lm_head: nn.Module = local.lm_head
        self._head = Coalescer(stacked(lambda hidden: self.lm_head(self.final_norm(hidden))), trailing_shape)
        # Steps of this process's sessions go through the swarm together (see coalesce.py).
        # Any steps may travel together: each server groups what it can run in one pass.
        self._steps: Coalescer[SessionStep, torch.Tensor] = Coalescer(step_together, max_wait=STEP_WAIT)
        self._generating = 0  # threads inside generate(): how many may share one LM-head pass
        self._generating_lock = threading.Lock()
        # Plain generations of every thread run in one loop, a round per token (decode_loop.py); each names its adapter.
        self.decode_loop = DecodeLoop(self)

    # ---- what the decode loop uses ----------------------------------------------------------------------
    def open_loop_session(self, max_length: int, adapter: str | None) -> InferenceSession:
        return InferenceSession(self.client, self.config.num_hidden_layers, max_length, 1, adapter=adapter,
                                lora=None if self.lora is None else self.lora.for_session())

    def embed_for_loop(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed_inputs(input_ids.to(self.device))).cpu()

    def logits_for_loop(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.final_norm(hidden.to(self.device))
        with torch_threads(self.client.config.head_threads or available_cores()):
            return self.lm_head(normed).cpu()

    @property
    def decode_threads(self) -> int:
        return self.client.config.decode_threads

    def _session_step(self, session: InferenceSession, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor | None) -> torch.Tensor:
        return self._steps(SessionStep(session, hidden, attention_mask, position_ids), companions=self._generating)

    # ---- sessions ----------------------------------------------------------------------------------------
    @contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Open server-side caches for up to `max_length` tokens; generate() inside uses them."""
        session = InferenceSession(self.client, self.config.num_hidden_layers, max_length + self.pre_seq_len, batch_size,
                                   adapter=self.adapter, lora=None if self.lora is None else self.lora.for_session())
        outer = self.active_session
        self._local_state.session = session
        try:
            yield session
        finally:
            self._local_state.session = outer
            session.close()

    @property
    def active_session(self) -> InferenceSession | None:
        """The session opened by inference_session() in this thread, if any."""
        return getattr(self._local_state, "session", None)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids)
        session = cache.session if isinstance(cache, RemoteCache) else None
        past = cache.get_seq_length() if isinstance(cache, RemoteCache) else 0
        hidden = self.run_blocks(inputs_embeds, attention_mask, position_ids, session, past)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if torch.is_grad_enabled():
            logits = self.lm_head(self.final_norm(hidden))
        else:
            logits = self._head(hidden, companions=self._generating)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # ---- generation --------------------------------------------------------------------------------------
    def _supports_default_dynamic_cache(self) -> bool:
        return False

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 session: InferenceSession | None = None, **kwargs: Any) -> Any:
        """transformers' generate(), with the attention caches on the servers.

        Inside ``inference_session()`` (or with ``session=``) the session is continued,
        so a later call may pass the whole conversation so far and only new tokens run.
        """
        if kwargs.get("num_beams", 1) > 1:
            raise NotImplementedError("beam search is not supported through the swarm")
        if kwargs.get("cache") is not None or kwargs.get("use_cache") is False:
            return super().generate(inputs, generation_config, **kwargs)
        with torch_threads(self.client.config.decode_threads):
            return self._generate(inputs, generation_config, session, **kwargs)

    def _generate(self, inputs: torch.Tensor | None, generation_config: GenerationConfig | None,
                  session: InferenceSession | None, **kwargs: Any) -> Any:
        session = session or self.active_session
        if session is not None:
            return super().generate(inputs, generation_config, cache=RemoteCache(session, self.pre_seq_len), **kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate() through the swarm needs input_ids")
        config = generation_config or self.generation_config
        if ids.dim() == 2 and ids.shape[0] == 1 and not self.pre_seq_len and not (inputs is not None and "input_ids" in kwargs):
            params = DecodeParams.from_generate(config, kwargs, ids.shape[1])
            if params is not None:
                # Views of this model (copy.copy, another adapter) share its loop: their generations share rounds.
                return self.decode_loop.generate(ids, params, self.adapter)
        max_new = kwargs.get("max_new_tokens") or config.max_new_tokens
        max_length = ids.shape[1] + max_new if max_new else kwargs.get("max_length") or config.max_length
        batch = ids.shape[0] * int(kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        with self._counted(), self.inference_session(max_length=max_length, batch_size=batch) as opened:
            return super().generate(inputs, generation_config, cache=RemoteCache(opened, self.pre_seq_len), **kwargs)

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._generating_lock:
            self._generating += 1
        try:
            yield
        finally:
            with self._generating_lock:
                self._generating -= 1


class DistributedModelForSequenceClassification(_DistributedModel):
    """Sequence classification over a swarm: the blocks remote, a trainable classification head local.

    Like transformers' ``*ForSequenceClassification``, the head reads the hidden state of each
    sequence's last non-padding token (right padding).
    """

    def __init__(self, config: PretrainedConfig, local: PreTrainedModel, client: SwarmClient, tokenizer: Any = None,
                 tuning_mode: str | None = None, pre_seq_len: int = 0, adapter: str | None = None, num_labels: int = 2,
                 lora_config: Any = None) -> None:
        super().__init__(config, local, client, tokenizer, tuning_mode, pre_seq_len, adapter, lora_config)
        self.num_labels = num_labels
        self.score = nn.Linear(int(config.hidden_size), num_labels, bias=False, dtype=local.dtype)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids)
        hidden = self.final_norm(self.run_blocks(inputs_embeds, attention_mask))
        if attention_mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:
            last = attention_mask.long().sum(dim=1).to(hidden.device) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.score(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
