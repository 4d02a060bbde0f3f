"""How from_pretrained builds the client's settings (no swarm: the client is captured before it connects)."""

from __future__ import annotations

import pytest

import llmswarm.model
from llmswarm import ClientConfig, DistributedModelForCausalLM


class _Captured(Exception):
    def __init__(self, config: ClientConfig) -> None:
        super().__init__("captured")
        self.config = config


def _capture_config(monkeypatch: pytest.MonkeyPatch) -> None:
    def client(swarm: str, config: ClientConfig) -> None:
        raise _Captured(config)

    monkeypatch.setattr(llmswarm.model, "resolve", lambda spec, progress=True: object())
    monkeypatch.setattr(llmswarm.model, "SwarmClient", client)
    monkeypatch.delenv("LLMSWARM_TOKEN", raising=False)


def config_of(**kwargs: object) -> ClientConfig:
    with pytest.raises(_Captured) as captured:
        DistributedModelForCausalLM.from_pretrained("any", swarm="http://127.0.0.1:1", progress=False, **kwargs)
    return captured.value.config


def test_a_client_configs_wire_dtype_is_kept_when_no_wire_dtype_is_given(monkeypatch):
    _capture_config(monkeypatch)
    given = ClientConfig(wire_dtype="bfloat16", max_retries=2)
    config = config_of(client_config=given)
    assert config.wire_dtype == "bfloat16" and config.max_retries == 2
    assert config_of().wire_dtype == "float32"
    assert config_of(client_config=given, wire_dtype="float16").wire_dtype == "float16"  # the argument wins
    assert given.wire_dtype == "bfloat16"  # the caller's object is not changed


def test_token_and_ca_arguments_override_the_config(monkeypatch):
    _capture_config(monkeypatch)
    config = config_of(client_config=ClientConfig(token="mine", tls_ca="/ca.pem"), token="theirs")
    assert config.token == "theirs" and config.tls_ca == "/ca.pem"


def test_an_unknown_wire_dtype_is_refused_at_once():
    with pytest.raises(ValueError, match="wire_dtype"):
        ClientConfig(wire_dtype="int8")  # type: ignore[arg-type]
