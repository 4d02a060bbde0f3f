"""Published LoRA adapters: checked once by the route map, served by name, each server fetching only its span's rows.

A client publishes its LoRA weights (``publish_adapter`` or ``llmswarm adapters push DIR``); another client, in
another process, generates with ``active_adapter=NAME`` exactly what local PEFT generates with those weights.
What does not fit the model, is too large, is not safetensors, has a bad name or would replace another
publisher's adapter is refused with a reason, and the servers go on serving.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import requests
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from llmswarm import DistributedModelForCausalLM
from llmswarm.publish import upload_body
from llmswarm_cli.main import main as cli
from llmswarm_control.adapters import AdapterLimits, AdapterRefused, AdapterStore, parse_upload
from llmswarm_core import wire
from llmswarm_core.lora import LoraSpec, PublishedBlocks, model_block_modules
from llmswarm_core.threads import torch_threads
from tests.conftest import chat_ids

NAME = "SmolLM2-135M-Instruct"
SPEC = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
SETTINGS = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def peft_state(blocks=30, r=4, paths=(("self_attn.q_proj", 576, 576), ("self_attn.v_proj", 576, 192)), seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(blocks):
        for path, fan_in, fan_out in paths:
            prefix = f"base_model.model.model.layers.{block}.{path}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) * 0.05
            state[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def shapes(smollm2):
    return model_block_modules(smollm2.config)[0]


def refused(data, shapes, limits=None, model=NAME, blocks=30):
    with pytest.raises(AdapterRefused) as caught:
        parse_upload(data, limits or AdapterLimits(), model, blocks, shapes)
    return caught.value.status, str(caught.value)


def test_an_upload_is_checked_against_the_model(shapes):
    good = upload_body(peft_state(), SPEC, NAME)
    publication = parse_upload(good, AdapterLimits(), NAME, 30, shapes)
    assert publication.weights.shape == (30, 4 * (576 + 576) + 4 * (576 + 192))
    cases = [
        (b"\x00" * 4, 400, "not a safetensors file"),
        (b"\xff" * 64, 400, "not a safetensors file"),
        (good[:-10], 400, "outside the data"),
        (upload_body(peft_state(), SPEC, "another-model"), 409, "the swarm serves"),
        (upload_body(peft_state(blocks=29), SPEC, NAME), 400, "every block 0..29"),
        (upload_body(peft_state(paths=(("self_attn.q_proj", 576, 576),)), SPEC, NAME), 400, "match no weights"),
        (upload_body(peft_state(paths=(("self_attn.q_proj", 500, 576), ("self_attn.v_proj", 576, 192))), SPEC, NAME),
         400, "does not fit the model"),
        (upload_body({**peft_state(), "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 576)}, SPEC, NAME), 400,
         "not a LoRA weight of a block"),
        (upload_body(peft_state(r=2), SPEC, NAME), 400, "rank r=4"),
        (upload_body(peft_state(), LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj"]), NAME), 400,
         "match no weights"),
    ]
    for data, status, message in cases:
        got_status, got = refused(data, shapes)
        assert got_status == status and message in got, (message, got)
    assert refused(good, shapes, AdapterLimits(max_adapter_bytes=1000))[0] == 413
    fits_nothing = upload_body(peft_state(paths=(("self_attn.q_proj", 576, 576), ("self_attn.w_proj", 576, 192))),
                               LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "w_proj"]), NAME)
    assert "does not fit the model" in refused(fits_nothing, shapes)[1]
    nan = peft_state()
    nan["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    assert "not finite" in refused(upload_body(nan, SPEC, NAME), shapes)[1]


def test_names_and_publishers_are_checked(shapes):
    store = AdapterStore(shapes=shapes)
    data = upload_body(peft_state(), SPEC, NAME)
    store.publish("sql", data, "ann", "k" * 32, False, NAME, 30)
    for name in ("..", ".hidden", "a/b", "", "x" * 129, "-opt"):
        with pytest.raises(AdapterRefused, match="bad adapter name"):
            store.publish(name, data, "ann", "k" * 32, False, NAME, 30)
    with pytest.raises(AdapterRefused, match="exists") as caught:
        store.publish("sql", data, "bob", "b" * 32, False, NAME, 30)
    assert caught.value.status == 409
    with pytest.raises(AdapterRefused, match="only that publisher") as caught:
        store.publish("sql", data, "bob", "b" * 32, True, NAME, 30)
    assert caught.value.status == 403
    store.publish("sql", upload_body(peft_state(seed=1), SPEC, NAME), "ann", "k" * 32, True, NAME, 30)
    listing = store.listing()
    assert [(a["name"], a["publisher"], a["base_model"], a["target_modules"]) for a in listing] == [
        ("sql", "ann", NAME, ["q_proj", "v_proj"])]
    frame = wire.decode(store.blocks(store.get("sql"), 10, 20), wire.WireLimits())
    header = PublishedBlocks.model_validate(frame.header)
    assert (header.start, header.end, header.lora) == (10, 20, SPEC) and frame.tensors["lora"].shape[0] == 10
    full = AdapterStore(AdapterLimits(max_store_bytes=1000), shapes)
    with pytest.raises(AdapterRefused, match="store is full"):
        full.publish("big", data, "ann", "k" * 32, False, NAME, 30)


SECOND_CLIENT = """
import json, sys, torch
from llmswarm import DistributedModelForCausalLM
model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=sys.argv[1], active_adapter=sys.argv[2], progress=False)
ids = torch.tensor([json.loads(sys.argv[3])])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
print(json.dumps(out[0].tolist()))
"""


@pytest.mark.integration
def test_a_published_adapter_is_served_by_name_to_another_process(swarm3, local_smollm2, tmp_path, capsys):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="lora",
                                                        lora_config=config, progress=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in model.lora.parameters():
            parameter.normal_(std=0.05)
    entry = model.publish_adapter("greeter", publisher="tester")
    assert (entry["name"], entry["publisher"], entry["base_model"], entry["r"]) == ("greeter", "tester", NAME, 4)
    peft_model = get_peft_model(copy.deepcopy(local_smollm2), config)
    set_peft_model_state_dict(peft_model, model.peft_state_dict())
    ids = chat_ids(model.tokenizer, "Say hello.")
    with torch.no_grad(), torch_threads(1):
        expected = peft_model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **SETTINGS)[0].tolist()
        plain = local_smollm2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **SETTINGS)[0].tolist()
    assert expected != plain  # the adapter changes what is generated

    second = subprocess.run([sys.executable, "-c", SECOND_CLIENT, swarm3.url, "greeter", json.dumps(ids[0].tolist())],
                            capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == expected

    # A session and a stateless forward by name, in this process too; an unknown name is refused clearly.
    by_name = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, active_adapter="greeter",
                                                          progress=False)
    with torch.no_grad():
        torch.testing.assert_close(by_name(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    unknown = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, active_adapter="nope",
                                                          progress=False)
    with pytest.raises(Exception, match="unknown adapter 'nope'"):
        unknown(ids)

    # The CLI: push a saved adapter directory, list, and the refusals, while the servers keep serving.
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert cli(["adapters", "push", str(saved), "--name", "greeter-2", "--swarm", swarm3.url]) == 0
    assert cli(["adapters", "push", str(saved), "--name", "greeter-2", "--swarm", swarm3.url]) == 1
    assert "exists" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    assert cli(["adapters", "push", str(tmp_path / "broken"), "--name", "broken", "--swarm", swarm3.url]) == 1
    assert "not a readable safetensors file" in capsys.readouterr().err
    forged = requests.post(f"{swarm3.url}/v1/adapters/greeter", data=b"\x08" + b"\x00" * 7 + b"{}" * 4,
                           headers={"Content-Type": "application/octet-stream", "X-Llmswarm-Publisher-Key": "x" * 20},
                           timeout=30)
    assert forged.status_code == 409
    not_safetensors = requests.post(f"{swarm3.url}/v1/adapters/junk", data=b"\x08" + b"\x00" * 7 + b"[1,2,3]xx",
                                    headers={"Content-Type": "application/octet-stream",
                                             "X-Llmswarm-Publisher-Key": "x" * 20}, timeout=30)
    assert not_safetensors.status_code == 400 and "not a safetensors file" in not_safetensors.json()["error"]
    assert requests.post(f"{swarm3.url}/v1/adapters/a%2Fb", data=b"", timeout=30,
                         headers={"Content-Type": "application/octet-stream"}).status_code in (400, 404)
    assert cli(["adapters", "list", "--swarm", swarm3.url]) == 0
    listed = capsys.readouterr().out
    assert "greeter " in listed and "greeter-2" in listed and "tester" in listed and "broken" not in listed
    rows = requests.get(f"{swarm3.url}/v1/adapters/greeter/blocks/10-20", timeout=30)
    assert wire.decode(rows.content).tensors["lora"].shape[0] == 10  # a server fetches only its span's rows
    assert by_name.generate(ids, attention_mask=torch.ones_like(ids), **SETTINGS)[0].tolist() == expected


def test_published_adapters_are_kept_in_the_store_folder_across_restarts(shapes, tmp_path):
    """The route map's --adapter-dir (a PVC on Kubernetes): a new store over the same folder serves what the old one
    held, the same bytes to every server; a deletion and a damaged file are not brought back."""
    spec = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    first = AdapterStore(shapes=shapes, directory=tmp_path)
    first.publish("kept", upload_body(peft_state(), spec, NAME), "ada", "k" * 20, False, NAME, 30)
    first.publish("gone", upload_body(peft_state(seed=1), spec, NAME), "ada", "k" * 20, False, NAME, 30)
    first.delete("gone", "k" * 20)
    (tmp_path / "broken.json").write_text('{"publisher": "x", "key_hash": "y"}')
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    second = AdapterStore(shapes=shapes, directory=tmp_path)
    assert [a["name"] for a in second.listing()] == ["kept"]
    assert second.listing() == first.listing()
    stored = second.get("kept")
    assert second.blocks(stored, 3, 9) == first.blocks(first.get("kept"), 3, 9)
    with pytest.raises(AdapterRefused) as caught:  # its publisher key still holds after the restart
        second.publish("kept", upload_body(peft_state(seed=2), spec, NAME), "mallory", "m" * 20, True, NAME, 30)
    assert caught.value.status == 403
