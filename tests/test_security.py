"""The swarm token and TLS on a real swarm."""

from __future__ import annotations

import subprocess

import pytest
import requests
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from llmswarm import DistributedModelForCausalLM, SwarmError
from llmswarm_core.security import client_ssl_context
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids

pytestmark = pytest.mark.integration
TOKEN = "s3cret-swarm-token"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def secure_swarm(tls_files):
    cert, key = tls_files
    options = LocalSwarmOptions(model="smollm2", servers=2, port=0, progress=False, token=TOKEN, tls_cert=cert,
                                tls_key=key, tls_ca=cert, log_dir=OUTPUT / "secure-logs")
    with LocalSwarm(options) as swarm:
        yield swarm


def test_token_and_tls_generation(secure_swarm, tls_files):
    assert secure_swarm.url.startswith("https://")
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=secure_swarm.url, token=TOKEN, tls_ca=tls_files[0],
                                                        progress=False)
    assert all(s.url.startswith("https://") for s in model.client.routes().servers)
    ids = chat_ids(model.tokenizer, "What is the capital of France?")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in model.tokenizer.decode(out[0, ids.shape[1]:])


def test_missing_or_wrong_token_is_refused(secure_swarm, tls_files):
    cert = tls_files[0]
    server = secure_swarm.routes().servers[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for response in (requests.get(f"{secure_swarm.url}/v1/routes", headers=headers, verify=cert, timeout=10),
                         requests.get(f"{server.url}/info", headers=headers, verify=cert, timeout=10),
                         requests.post(f"{server.url}/v1/forward", data=b"x", headers=headers, verify=cert, timeout=10)):
            assert response.status_code == 401
            assert response.json() == {"error": "unauthorized"}  # nothing about the model, spans or servers
    with pytest.raises(InvalidStatus) as refused:
        connect(server.url.replace("https://", "wss://") + "/v1/session", ssl=client_ssl_context(cert),
                additional_headers={"Authorization": "Bearer wrong"})
    assert refused.value.response.status_code == 401
    # Probes and metrics stay open for kubelets and Prometheus.
    assert requests.get(f"{server.url}/healthz", verify=cert, timeout=10).status_code == 200
    assert requests.get(f"{server.url}/metrics", verify=cert, timeout=10).status_code == 200
    with pytest.raises(SwarmError, match="refused the swarm token"):
        DistributedModelForCausalLM.from_pretrained("smollm2", swarm=secure_swarm.url, token="wrong", tls_ca=cert,
                                                    progress=False)


def test_plain_http_is_not_served(secure_swarm):
    with pytest.raises(requests.ConnectionError):
        requests.get(secure_swarm.url.replace("https://", "http://") + "/healthz", timeout=5)
