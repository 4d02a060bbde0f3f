"""`python -m llmswarm.gateway` (what `llmswarm gateway` runs) as a user starts it: a process over the real swarm."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import openai
import pytest
import requests

from tests.conftest import OUTPUT

pytestmark = pytest.mark.integration


def test_gateway_process_serves_with_the_token_from_the_environment(swarm3: Any) -> None:
    log = OUTPUT / "gateway" / "cli-gateway.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The API key from the environment: LLMSWARM_GATEWAY_TOKEN (LLMSWARM_TOKEN is the swarm credential, never a key).
    env = {**os.environ, "LLMSWARM_GATEWAY_TOKEN": "cli-token", "LLMSWARM_TOKEN": "", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "llmswarm.gateway", "--swarm", swarm3.url, "--port", "0", "--max-tokens", "64",
               "--served-model-name", "smol"]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.match(r"gateway: (http://127\.0\.0\.1:\d+)", first)
        assert match, f"unexpected first line {first!r}; log: {log.read_text()}"
        url = match.group(1)
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-token", max_retries=0)
        ids = [m.id for m in client.models.list().data]  # the model, then it with each adapter published to swarm3
        assert ids[0] == "smol" and all(i.startswith("smol:") for i in ids[1:]), ids
        reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                               temperature=0, max_tokens=12)
        assert "Paris" in (reply.choices[0].message.content or "")
        with pytest.raises(openai.BadRequestError):  # --max-tokens 64
            client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--swarm", "http://127.0.0.1:1", "--max-concurrent", "0"], "--max-concurrent must be at least 1"),
    (["--swarm", "http://127.0.0.1:1", "--write-timeout", "-1"], "--write-timeout must be above 0"),
    ([], "the following arguments are required: --swarm"),
])
def test_gateway_command_refuses_bad_options(arguments: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "llmswarm.gateway", *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
