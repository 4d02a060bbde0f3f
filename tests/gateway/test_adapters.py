"""The gateway serves adapters published to the swarm as models named ``base:adapter`` (issue #17): the OpenAI
client's `model` field picks one, and the answer is exactly what local PEFT generates with those weights."""

from __future__ import annotations

import copy
from typing import Any

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from llmswarm import DistributedModelForCausalLM
from llmswarm_core.threads import torch_threads
from tests.gateway.conftest import TOKEN, GatewayThread

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "Say hello."}]


def test_a_published_adapter_is_a_model_of_the_gateway(gateway: GatewayThread, swarm3: Any, local_smollm2: Any,
                                                       tokenizer: Any) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm3.url, tuning_mode="lora",
                                                          lora_config=config, progress=False)
    torch.manual_seed(11)
    with torch.no_grad():
        for parameter in trainer.lora.parameters():
            parameter.normal_(std=0.05)
    trainer.publish_adapter("gateway-greeter", publisher="tester")
    peft_model = get_peft_model(copy.deepcopy(local_smollm2), config)
    set_peft_model_state_dict(peft_model, trainer.peft_state_dict())
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad(), torch_threads(1):
        adapted = peft_model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                             do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        plain = local_smollm2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert adapted.tolist() != plain.tolist()  # the adapter changes the answer

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    name = f"{MODEL}:gateway-greeter"
    assert name in [m.id for m in client.models.list().data]
    assert client.models.retrieve(name).id == name
    reply = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.model == name
    assert reply.choices[0].message.content == tokenizer.decode(adapted, skip_special_tokens=True)
    base = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert base.choices[0].message.content == tokenizer.decode(plain, skip_special_tokens=True)
    for unknown in (f"{MODEL}:nope", f"{MODEL}:../x", "gpt-4o:gateway-greeter", f"{MODEL}:"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=unknown, messages=QUESTION, max_tokens=2)
        assert caught.value.code == "model_not_found"
