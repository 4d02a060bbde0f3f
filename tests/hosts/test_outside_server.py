"""An outside server behind NAT joins a swarm, and a laptop reaches it through one public address (issue #16).

Three hosts on one bridge, each a network namespace with its own address (10.244.0.0/16, only inside the
namespaces this test creates, all removed at the end):

- *cluster*: ``llmswarm up --relay`` checking credentials of the swarm's authority. Its route map listens on the
  host's address: the swarm's one public address. Its two servers (blocks [0, 15) and [15, 30)) listen on the
  host's loopback only, as pods listen on addresses that only their cluster reaches;
- *volunteer*: ``llmswarm serve --join URL --relay`` with a credential holding use and join, its own key, blocks
  [15, 30), listening on its loopback only: nothing can connect to it. It dials out to the relay and is listed at
  ``<public address>/relay/volunteer-1``;
- *laptop*: a Python client holding a use credential, with ``ClientConfig(relay=True)``: it reaches every server
  through the public address (the servers' listed addresses are loopback addresses of another host).

From the laptop, greedy generation through a chain that mixes a cluster server and the volunteer's server equals
local transformers exactly, a prompt-tuning step through it gives the local loss and gradients, and a SIGKILL of the
volunteer in the middle of a generation still gives identical output (the client fails over to the cluster's server
of those blocks and replays the session there).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoTokenizer

from llmswarm_core.credentials import Authority
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.security import AUTHORITY_ENV, TOKEN_ENV
from tests.conftest import OUTPUT, chat_ids
from tests.kube.network import PodAddress, PodNetwork
from tests.test_finetune import local_prompt_loss

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (netns)"),
]
LOGS = OUTPUT / "hosts"
PORT = 8700
NEW_TOKENS = 12
PROMPT = "Name three rivers in Europe."

TUNE = """
import json, sys, torch
from llmswarm import DistributedModelForCausalLM
from llmswarm.config import ClientConfig

url, avoid, text = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=url, tuning_mode="ptune", pre_seq_len=4,
                                                    progress=False, client_config=ClientConfig(relay=True))
model.client.ban(avoid, 10**9)  # the backward goes through the volunteer's server too
ids = model.tokenizer([text], return_tensors="pt")["input_ids"]
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
print(json.dumps({"ids": ids.tolist(), "loss": loss.item(), "prompts": model.prompt_embeddings.weight.tolist(),
                  "grad": model.prompt_embeddings.weight.grad.tolist()}), flush=True)
"""

LAPTOP = """
import json, sys, torch
from llmswarm import DistributedModelForCausalLM
from llmswarm.config import ClientConfig
from transformers import TextStreamer

url, avoid, pause = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=url, progress=False,
                                                    client_config=ClientConfig(max_retries=8, relay=True))
model.client.ban(avoid, 10**9)  # the chain goes through the volunteer's server
ids = model.tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[4]}], add_generation_prompt=True,
                                          return_tensors="pt")
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

class Pause:
    seen = 0
    def put(self, value):
        Pause.seen += 1
        if pause and Pause.seen == pause + 1:  # the prompt, then `pause` tokens
            print("PAUSED", flush=True)
            sys.stdin.readline()  # the test kills the volunteer meanwhile
            model.client.ban(avoid, 0)  # the cluster's server of those blocks may serve again
    def end(self):
        pass

chain = [s.id for s in model.client.routes().servers if s.id != avoid]
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[5]), do_sample=False, streamer=Pause())
print(json.dumps({"tokens": out[0].tolist(), "servers": chain, "stats": vars(model.client.stats)}), flush=True)
"""


def in_host(host: PodAddress, *command: str, env: dict[str, str], log: Path, stdin: int | None = None,
            stdout: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", host.namespace, *command], env=env, stdin=stdin,
                            stdout=stdout if stdout is not None else open(log, "wb"), stderr=open(log.with_suffix(".err"), "wb"),
                            start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
async def hosts() -> AsyncIterator[dict[str, PodAddress]]:
    network = PodNetwork()
    await network.create()
    try:
        yield {name: await network.add_pod() for name in ("cluster", "volunteer", "laptop")}
    finally:
        await network.close()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def test_a_volunteer_server_on_another_host_serves_a_laptop_exactly_and_its_loss_is_survived(
        hosts: dict[str, PodAddress], smollm2, local_smollm2, tmp_path: Path) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    authority = Authority(ServerIdentity.generate())
    operator_credential = authority.issue("cluster", ["use", "join"])
    volunteer_credential = authority.issue("volunteer", ["use", "join"])
    laptop_credential = authority.issue("laptop", ["use"])
    cluster, volunteer, laptop = hosts["cluster"], hosts["volunteer"], hosts["laptop"]
    base_env = {**os.environ, AUTHORITY_ENV: authority.public_key, "TOKENIZERS_PARALLELISM": "false"}
    url = f"http://{cluster.ip}:{PORT}"
    up = in_host(cluster, sys.executable, "-m", "llmswarm_cli.main", "up", "--host", cluster.ip, "--port", str(PORT),
                 "--server-host", "127.0.0.1", "--relay", "--servers", "2", "--blocks-per-server", "15",
                 env={**base_env, TOKEN_ENV: operator_credential}, log=LOGS / "cluster.log")
    serve = in_host(volunteer, sys.executable, "-m", "llmswarm_node.main", "--model", "smollm2", "--blocks", "15:30",
                    "--host", "127.0.0.1", "--port", str(PORT + 1), "--join", url, "--relay", "--server-id", "volunteer-1",
                    "--identity-file", str(tmp_path / "volunteer.pem"), "--quiet",
                    env={**base_env, TOKEN_ENV: volunteer_credential}, log=LOGS / "volunteer.log")
    try:
        # The route map lists the volunteer online only once its address answered the identity challenge; the test
        # process is in no namespace of the three: it asks from the laptop.
        await until(lambda: _routes_from(laptop, url, laptop_credential), 300, "the three servers online")
        listed = _listed_urls(laptop, url, laptop_credential)
        assert listed["volunteer-1"] == f"{url}/relay/volunteer-1"
        # Nothing reaches the volunteer, and the laptop reaches no server at its listed address: only the relay.
        assert not _connects(cluster, f"http://{volunteer.ip}:{PORT + 1}/healthz")
        assert not _connects(laptop, listed["local-1"] + "/healthz")
        assert _connects(cluster, listed["local-1"] + "/healthz")
        ids = chat_ids(AutoTokenizer.from_pretrained(smollm2.path), PROMPT)
        expected = local_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                          do_sample=False)[0].tolist()
        env = {**base_env, TOKEN_ENV: laptop_credential}
        # 1. Through the volunteer, from the laptop: exactly local transformers' tokens.
        script = tmp_path / "laptop.py"
        script.write_text(LAPTOP)
        first = subprocess.run(["ip", "netns", "exec", laptop.namespace, sys.executable, str(script), url, "local-1", "0",
                                PROMPT, str(NEW_TOKENS)], env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        result = json.loads(first.stdout.strip().splitlines()[-1])
        assert result["tokens"] == expected
        assert "volunteer-1" in result["servers"]
        # 2. A prompt-tuning step through the same chain: the local loss and gradients.
        tune = tmp_path / "tune.py"
        tune.write_text(TUNE)
        step = subprocess.run(["ip", "netns", "exec", laptop.namespace, sys.executable, str(tune), url, "local-1",
                               "The quick brown fox jumps over the lazy dog."], env=env, capture_output=True, text=True,
                              timeout=300)
        assert step.returncode == 0, step.stderr[-3000:]
        tuned = json.loads(step.stdout.strip().splitlines()[-1])
        shallow = torch.tensor(tuned["prompts"]).requires_grad_(True)
        expected_loss = local_prompt_loss(local_smollm2, torch.tensor(tuned["ids"]), shallow, None)
        expected_loss.backward()
        assert abs(tuned["loss"] - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
        got, want = torch.tensor(tuned["grad"]), shallow.grad
        assert want.abs().sum() > 0 and (got - want).norm() <= 2e-4 * want.norm()
        # 3. The volunteer is SIGKILLed mid-generation: the laptop's output does not change.
        second = in_host(laptop, sys.executable, str(script), url, "local-1", "4", PROMPT, str(NEW_TOKENS), env=env,
                         log=LOGS / "laptop.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert second.stdout is not None and second.stdin is not None
        line = await asyncio.wait_for(asyncio.to_thread(second.stdout.readline), 300)
        assert line.strip() == b"PAUSED", line
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()
        second.stdin.write(b"go\n")
        second.stdin.flush()
        out, _ = await asyncio.to_thread(second.communicate, None, 300)
        assert second.returncode == 0, (LOGS / "laptop.err").read_text()[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["tokens"] == expected
        assert result["stats"]["failovers"] >= 1
    finally:
        stop(serve)
        stop(up)


def _connects(host: PodAddress, url: str) -> bool:
    """Whether an HTTP GET of `url` from `host` gets any answer."""
    probe = "import sys, urllib.request\nurllib.request.urlopen(sys.argv[1], timeout=3)\n"
    done = subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-c", probe, url], capture_output=True,
                          timeout=30)
    return done.returncode == 0


def _listed_urls(host: PodAddress, url: str, credential: str) -> dict[str, str]:
    probe = ("import json, sys, urllib.request\n"
             "request = urllib.request.Request(sys.argv[1] + '/v1/routes', headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
             "print(json.dumps({s['id']: s['url'] for s in json.load(urllib.request.urlopen(request, timeout=5))['servers']}))\n")
    done = subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-c", probe, url, credential],
                          capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def _routes_from(host: PodAddress, url: str, credential: str) -> bool:
    """Whether the route map, asked from `host`, lists the cluster's two servers and the volunteer online."""
    probe = ("import json, sys, urllib.request\n"
             "request = urllib.request.Request(sys.argv[1] + '/v1/routes', headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
             "servers = json.load(urllib.request.urlopen(request, timeout=5))['servers']\n"
             "print(sorted(s['id'] for s in servers if s['state'] == 'online'))\n")
    done = subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-c", probe, url, credential],
                          capture_output=True, text=True, timeout=30)
    return done.returncode == 0 and done.stdout.strip() == "['local-0', 'local-1', 'volunteer-1']"

