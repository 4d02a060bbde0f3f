"""Training through the swarm: prompt tuning, a classification head, server-hosted LoRA adapters.

Quantized servers are checked against local quantized blocks in test_quantized_swarm.py.
"""

from __future__ import annotations

import pytest
import requests
import torch
import torch.nn.functional as F

from llmswarm import DistributedModelForCausalLM, DistributedModelForSequenceClassification
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids

pytestmark = pytest.mark.integration


def local_prompt_loss(local, ids, shallow, deep):
    """The same prompt-tuned loss computed by plain transformers, deep prompts added by hooks."""
    prefix = shallow.shape[0]
    handles = []
    if deep is not None:
        for i, layer in enumerate(local.model.layers):
            def hook(module, args, kwargs, prompt=deep[i]):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :prefix] + prompt, hidden[:, prefix:]], dim=1)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        embeds = torch.cat([shallow.unsqueeze(0).expand(ids.shape[0], -1, -1), local.model.embed_tokens(ids)], dim=1)
        positions = torch.arange(embeds.shape[1]).unsqueeze(0)
        logits = local(inputs_embeds=embeds, position_ids=positions).logits[:, prefix:]
    finally:
        for handle in handles:
            handle.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_match_local(swarm3, local_smollm2, mode):
    torch.manual_seed(0)
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode=mode, pre_seq_len=4,
                                                        progress=False)
    if mode == "deep_ptune":
        torch.nn.init.normal_(model.intermediate_prompt_embeddings.weight, std=0.02)
    ids = model.tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    shallow = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep = None
    if mode == "deep_ptune":
        weight = model.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = weight.view(4, 30, -1).permute(1, 0, 2)
    expected = local_prompt_loss(local_smollm2, ids, shallow, deep)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    pairs = [(model.prompt_embeddings.weight.grad, shallow.grad)]
    if mode == "deep_ptune":
        pairs.append((model.intermediate_prompt_embeddings.weight.grad, weight.grad))
    for got, want in pairs:
        assert want.abs().sum() > 0
        # float32 through 30 blocks run as three separate backward passes: the error, relative to the
        # gradient's scale, stays at float32 noise (about 1e-3 of its largest entry, 1e-4 of its norm)
        assert (got - want).abs().max() <= 2e-3 * want.abs().max()
        assert (got - want).norm() <= 2e-4 * want.norm() + 1e-12
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99999


def test_twenty_steps_of_prompt_tuning_lower_the_loss_and_leave_server_weights_alone(swarm3):
    digests = {s.id: requests.get(f"{s.url}/v1/weights-digest", timeout=60).json()["sha256"] for s in swarm3.routes().servers}
    torch.manual_seed(0)
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="deep_ptune",
                                                        pre_seq_len=4, progress=False)
    batch = model.tokenizer(["Q: What color is the sky? A: blue", "Q: What color is grass? A: green"],
                            return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(model.prompt_embeddings.weight), id(model.intermediate_prompt_embeddings.weight)}
    optimizer = torch.optim.Adam(trainable, lr=0.02)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    after = {s.id: requests.get(f"{s.url}/v1/weights-digest", timeout=60).json()["sha256"] for s in swarm3.routes().servers}
    assert after == digests


def test_generation_with_trained_prompts_uses_them(swarm3, local_smollm2):
    """ptune prompts also steer generation through inference sessions (greedy equals the local computation)."""
    torch.manual_seed(1)
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="ptune", pre_seq_len=3,
                                                        progress=False)
    ids = chat_ids(model.tokenizer, "Name a color.")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    shallow = model.prompt_embeddings.weight.detach()
    tokens = ids
    with torch.no_grad():
        for _ in range(out.shape[1] - ids.shape[1]):
            embeds = torch.cat([shallow.unsqueeze(0), local_smollm2.model.embed_tokens(tokens)], dim=1)
            logits = local_smollm2(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1]).unsqueeze(0)).logits
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == tokens.tolist()


def test_generation_with_deep_prompts_through_sessions(swarm3):
    """deep_ptune prompts steer generation through inference sessions: each server adds its blocks' prompts in
    the session's first step (they live on in the cached prefix); greedy output equals generating without a
    session, where every step is a stateless forward of the whole sequence with the deep prompts."""
    torch.manual_seed(2)
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="deep_ptune", pre_seq_len=3,
                                                        progress=False)
    ids = chat_ids(model.tokenizer, "Name a color.")
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.intermediate_prompt_embeddings.weight.normal_(std=0.5)  # deep prompts start at zero: make them count
        first_logits = model(ids).logits[:, -1]
        model.intermediate_prompt_embeddings.weight.zero_()
        assert not torch.allclose(first_logits, model(ids).logits[:, -1], atol=1e-3)  # they do change the output
        torch.manual_seed(2)
        model.intermediate_prompt_embeddings.weight.normal_(std=0.5)
    through_sessions = model.generate(ids, **settings)
    stateless = model.generate(ids, use_cache=False, **settings)
    assert through_sessions.tolist() == stateless.tolist()


def test_session_deep_prompts_are_checked(swarm3):
    from websockets.sync.client import connect

    from llmswarm_core import wire

    server = next(s for s in swarm3.routes().servers if s.start == 0)
    with connect(server.url.replace("http://", "ws://") + "/v1/session", compression=None) as sock:
        def call(header, tensors=None):
            sock.send(wire.encode(header, tensors))
            return wire.decode(sock.recv(timeout=60)).header

        session = call({"kind": "open", "start": 0, "end": 10, "max_length": 16})["session"]
        hidden = torch.randn(1, 4, 576)
        wrong_blocks = call({"kind": "step", "session": session}, {"hidden": hidden, "prompts": torch.randn(9, 1, 2, 576)})
        assert wrong_blocks["code"] == "bad_request" and "'prompts' must be" in wrong_blocks["message"]
        too_long = call({"kind": "step", "session": session}, {"hidden": hidden, "prompts": torch.randn(10, 1, 5, 576)})
        assert too_long["code"] == "bad_request"
        assert call({"kind": "step", "session": session},
                    {"hidden": hidden, "prompts": torch.randn(10, 1, 2, 576)})["kind"] == "output"
        later = call({"kind": "step", "session": session},
                     {"hidden": torch.randn(1, 1, 576), "prompts": torch.randn(10, 1, 1, 576)})
        assert later["code"] == "bad_request" and "first step only" in later["message"]
        assert call({"kind": "step", "session": session}, {"hidden": torch.randn(1, 1, 576)})["kind"] == "output"


def test_sequence_classification_head_trains(swarm3):
    torch.manual_seed(0)
    model = DistributedModelForSequenceClassification.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="ptune",
                                                                      pre_seq_len=2, num_labels=2, progress=False)
    model.tokenizer.padding_side = "right"
    texts = ["I love this movie, it is wonderful", "This film was terrible and boring",
             "What a great and happy day", "An awful, sad and painful experience"]
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0, 1, 0])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        output = model(**batch, labels=labels)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert output.logits.shape == (4, 2)
    assert losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def lora_adapter(local_smollm2, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    import copy

    peft_model = get_peft_model(copy.deepcopy(local_smollm2), config)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)  # a trained adapter: B is not zero
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path, peft_model.eval()


def test_server_hosted_lora_adapter_equals_local_peft(lora_adapter, local_smollm2):
    path, peft_model = lora_adapter
    options = LocalSwarmOptions(model="smollm2", servers=2, port=0, progress=False,
                                server_args=["--adapters", f"sql={path}"], log_dir=OUTPUT / "adapter-logs")
    with LocalSwarm(options) as swarm:
        adapted = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, active_adapter="sql", progress=False)
        plain = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False)
        ids = chat_ids(adapted.tokenizer, "Write a short greeting.")
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(plain(ids).logits, local_smollm2(ids).logits, rtol=1e-4, atol=1e-4)
            expected = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                           do_sample=False, pad_token_id=0)
        got = adapted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert got.tolist() == expected.tolist()
        unknown = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, active_adapter="nope", progress=False)
        with pytest.raises(Exception, match="unknown adapter"):
            unknown(ids)


def test_an_adapter_from_the_hub_cache_equals_the_same_adapter_from_a_folder(lora_adapter, smollm2, tmp_path, monkeypatch):
    """``--adapters name=hub:ORG/NAME`` (spec.adapters[].hub): the repository's two adapter files, read through the
    Hugging Face cache; here offline, from a cache laid out as the hub client writes it."""
    import shutil

    from llmswarm_node.span import SpanModel
    from llmswarm_node.span_loader import adapter_folder, load_adapter

    path, _ = lora_adapter
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--sql-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(path, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert adapter_folder("hub:acme/sql-lora") == repo / "snapshots" / commit
    from_folder, from_hub = SpanModel(smollm2, 0, 2, progress=False), SpanModel(smollm2, 0, 2, progress=False)
    load_adapter(from_folder.loaded, "sql", path)
    load_adapter(from_hub.loaded, "sql", "hub:acme/sql-lora")
    hidden = torch.randn(1, 5, 576)
    with torch.no_grad():
        torch.testing.assert_close(from_hub.forward(hidden, adapter="sql"), from_folder.forward(hidden, adapter="sql"),
                                   rtol=0, atol=0)
        assert not torch.equal(from_hub.forward(hidden, adapter="sql"), from_hub.forward(hidden))
    with pytest.raises(Exception, match="acme/missing"):
        adapter_folder("hub:acme/missing")
