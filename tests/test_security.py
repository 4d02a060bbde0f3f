"""The swarm token and TLS on a real swarm."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import ssl
import subprocess
import threading
from collections.abc import Iterator

import pytest
import requests
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from llmswarm import DistributedModelForCausalLM, SwarmError
from llmswarm_core.security import client_ssl_context
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions
from tests.conftest import OUTPUT, chat_ids
from tests.helpers import metric_total

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
    options = LocalSwarmOptions(model="smollm2", servers=3, port=0, progress=False, token=TOKEN, tls_cert=cert,
                                tls_key=key, tls_ca=cert, log_dir=OUTPUT / "secure-logs")
    with LocalSwarm(options) as swarm:
        yield swarm


def pushed_hops(swarm, cert, status: str = "ok") -> float:
    return sum(metric_total(requests.get(f"{s.url}/metrics", verify=cert, timeout=10).text, "llmswarm_pushes_total",
                            status=status) for s in swarm.routes().servers)


def test_token_and_tls_generation_is_exact_and_pushed(secure_swarm, tls_files, local_smollm2):
    """Over TLS with a token, servers push to each other (wss with the swarm token), and the output is local's."""
    cert = tls_files[0]
    assert secure_swarm.url.startswith("https://")
    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=secure_swarm.url, token=TOKEN, tls_ca=cert,
                                                        progress=False)
    assert model.client.config.push
    assert all(s.url.startswith("https://") for s in model.client.routes().servers)
    ids = chat_ids(model.tokenizer, "What is the capital of France?")
    # Servers learn their push peers from the route map in the background (never on a step's path): warm-up
    # generations until one has no failed push, so that each server knows the next before the pushes are counted.
    for _ in range(20):
        failed_before = pushed_hops(secure_swarm, cert, "failed")
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        if pushed_hops(secure_swarm, cert, "failed") == failed_before:
            break
    else:
        raise AssertionError("the servers never learned their push peers")
    before, failed_before = pushed_hops(secure_swarm, cert), pushed_hops(secure_swarm, cert, "failed")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    expected = local_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert out.tolist() == expected.tolist()
    # A chain over the 3 servers pushes twice per pushed step. Of generate()'s 10 steps, the session's opening
    # ones go hop by hop (the same happens without TLS); every later one is pushed, none fails.
    hops = len(model.client.routes().servers) - 1
    assert pushed_hops(secure_swarm, cert) - before >= hops * 8
    assert pushed_hops(secure_swarm, cert, "failed") == failed_before


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
                additional_headers={"Authorization": "Bearer wrong"}, open_timeout=30)
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



# ---- TLS failures are clear errors -----------------------------------------------------------------------------


def make_cert(folder, name: str, san: x509.GeneralName, valid_days: int = 1) -> tuple[str, str]:
    """A self-signed certificate for `san`; a negative `valid_days` gives one that expired that many days ago."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=valid_days)) if valid_days > 0 else \
        (now - datetime.timedelta(days=10), now + datetime.timedelta(days=valid_days))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture(scope="module")
def tls_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls-cases")
    return {
        "other_ca": make_cert(folder, "other-ca", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        "wrong_host": make_cert(folder, "wrong-host", x509.DNSName("not-this-host.example")),
        "expired": make_cert(folder, "expired", x509.IPAddress(ipaddress.ip_address("127.0.0.1")), valid_days=-1),
    }


def test_a_client_that_trusts_another_ca_gets_a_clear_error(secure_swarm, tls_cases):
    with pytest.raises(SwarmError, match="certificate verify failed"):
        DistributedModelForCausalLM.from_pretrained("smollm2", swarm=secure_swarm.url, token=TOKEN,
                                                    tls_ca=tls_cases["other_ca"][0], progress=False)


@contextlib.contextmanager
def https_server(cert: str, key: str) -> Iterator[str]:
    """A plain HTTPS endpoint with this certificate (the handshake is what is tested, not what it serves)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("case", "reason"), [("wrong_host", "mismatch"), ("expired", "expired")])
def test_a_server_with_a_bad_certificate_is_a_clear_error(tls_cases, case, reason):
    """A route map whose certificate names another host, or has expired, is refused with the reason."""
    cert, key = tls_cases[case]
    with https_server(cert, key) as url, pytest.raises(SwarmError, match=f"certificate verify failed.*{reason}"):
        DistributedModelForCausalLM.from_pretrained("smollm2", swarm=url, token=TOKEN, tls_ca=cert, progress=False)


# ---- every route of every service asks for the token ---------------------------------------------------------


BLOCK_SERVER_ROUTES = [("POST", "/v1/forward"), ("POST", "/v1/backward"), ("GET", "/v1/weights-digest"), ("GET", "/v1/session"),
                       ("GET", "/v1/push"), ("GET", "/info")]
ROUTE_MAP_ROUTES = [("GET", "/v1/routes"), ("POST", "/v1/servers"), ("DELETE", "/v1/servers/local-0"), ("GET", "/v1/targets")]
# Path tricks against the list of open paths: none of these may reach a protected handler without the token.
TRICKS = [("GET", "//v1/routes"), ("GET", "/metrics/../v1/routes"), ("GET", "/healthz/../v1/routes"), ("GET", "/v1/routes/"),
          ("GET", "/metrics/"), ("GET", "/%2fv1/routes"), ("GET", "/V1/ROUTES")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}],
                         ids=["none", "wrong", "no-scheme", "basic"])
def test_every_route_refuses_a_missing_or_wrong_token(secure_swarm, tls_files, headers):
    cert = tls_files[0]
    server = secure_swarm.routes().servers[0].url
    for base, routes in ((server, BLOCK_SERVER_ROUTES + TRICKS), (secure_swarm.url, ROUTE_MAP_ROUTES + TRICKS)):
        for method, path in routes:
            response = requests.request(method, base + path, data=b"{}", headers={**headers, "Content-Type": "application/json"},
                                        verify=cert, timeout=10, allow_redirects=False)
            assert response.status_code in (401, 404), (base, method, path, response.status_code, response.text)
            assert "local-" not in response.text and "SmolLM2" not in response.text, (method, path, response.text)
    # The route map still lists every server: nothing above changed it.
    assert len(secure_swarm.routes().servers) == 3


def test_the_gateway_refuses_a_missing_or_wrong_key_on_every_api_route(gateway_with_key):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "gateway-key"}):
        for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/models/SmolLM2-135M-Instruct"), ("GET", "//v1/models"), ("GET", "/v1/models/")):
            response = requests.request(method, gateway_with_key + path, json={}, headers=headers, timeout=10,
                                        allow_redirects=False)
            assert response.status_code in (401, 404), (method, path, response.status_code)
            assert "SmolLM2" not in response.text


@pytest.fixture(scope="module")
def gateway_with_key(secure_swarm, tls_files):
    from llmswarm.gateway.options import GatewayOptions
    from tests.gateway.conftest import GatewayThread

    options = GatewayOptions(swarm=secure_swarm.url, port=0, token="gateway-key", load_retry_seconds=0.2)
    with GatewayThread(options) as running:
        yield running.url
