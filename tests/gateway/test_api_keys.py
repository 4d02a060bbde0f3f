"""The gateway's API keys: many, hashed, revocable, rate-limited per key, counted per key; never swarm credentials."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from llmswarm.gateway.keys import KeyFileError, KeyStore, create_key, digest, read_keys, revoke_key
from llmswarm.gateway.options import GatewayOptions
from tests.gateway.conftest import GatewayThread, metric

MODEL = "SmolLM2-135M-Instruct"


def test_keys_are_kept_hashed_and_found_by_digest(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    alice = create_key(path, "alice", requests_per_minute=2)
    bob = create_key(path, "bob")
    stored = path.read_text()
    assert alice not in stored and bob not in stored and digest(alice) in stored
    assert path.stat().st_mode & 0o777 == 0o600
    store = KeyStore.load(path)
    found = store.find(alice)
    assert found is not None and found.name == "alice" and store.find("sk-lsw-guess") is None
    with pytest.raises(KeyFileError, match="already has"):
        create_key(path, "alice")
    with pytest.raises(KeyFileError, match="key name"):
        create_key(path, "bad name!")


def test_a_rate_limit_refills_over_time(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "alice", requests_per_minute=2)
    store = KeyStore.load(path)
    found = store.find(key)
    assert found is not None
    assert store.wait_for(found, now=100.0) == 0 and store.wait_for(found, now=100.0) == 0
    assert store.wait_for(found, now=100.0) == pytest.approx(30.0)
    assert store.wait_for(found, now=131.0) == 0  # half a minute later one more request is allowed


def test_a_revoked_key_is_refused_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "alice")
    store = KeyStore.load(path)
    assert store.find(key) is not None
    time.sleep(0.01)
    revoke_key(path, "alice")
    store.refresh(force=True)
    assert store.find(key) is None
    assert [k.revoked for k in read_keys(path)] == [True]


def test_the_command_line_creates_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    run = [sys.executable, "-m", "llmswarm_cli", "gateway-keys"]
    created = subprocess.run([*run, "create", "--file", str(path), "--name", "ci", "--requests-per-minute", "5"],
                             capture_output=True, text=True, check=True)
    key = created.stdout.strip()
    assert key.startswith("sk-lsw-") and json.loads(path.read_text())["keys"][0]["requests_per_minute"] == 5
    subprocess.run([*run, "revoke", "--file", str(path), "--name", "ci"], check=True, capture_output=True)
    assert KeyStore.load(path).find(key) is None


@pytest.fixture(scope="module")
def keyed_gateway(swarm3: Any, model3: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {"alice": create_key(path, "alice", requests_per_minute=3), "bob": create_key(path, "bob")}
    options = GatewayOptions(swarm=swarm3.url, port=0, api_keys=str(path), max_tokens=64)
    with GatewayThread(options, model=model3) as running:
        yield running, keys, path


def test_per_key_limits_usage_and_revocation_on_a_live_gateway(keyed_gateway: Any) -> None:
    gateway, keys, path = keyed_gateway
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say yes."}], "temperature": 0, "max_tokens": 2}

    def ask(key: str) -> requests.Response:
        return requests.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                             timeout=120)

    assert [ask(keys["alice"]).status_code for _ in range(3)] == [200, 200, 200]
    limited = ask(keys["alice"])
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["Retry-After"]) >= 1
    assert ask(keys["bob"]).status_code == 200  # another key has its own budget
    assert ask("sk-lsw-not-a-key").status_code == 401
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric(text, "llmswarm_gateway_key_requests_total", key="alice", status="ok") == 3
    assert metric(text, "llmswarm_gateway_key_requests_total", key="alice", status="rate_limited") == 1
    assert metric(text, "llmswarm_gateway_key_tokens_total", key="bob", kind="completion") >= 1
    revoke_key(path, "bob")
    deadline = time.monotonic() + 10
    while ask(keys["bob"]).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.5)
