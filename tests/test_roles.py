"""Credentials with roles (issue #16) at a real route map and a real block server: use, join and admin are separate,
a credential without the role is refused (403) and one that proves nothing (a gateway key, garbage, expired,
revoked) gets a bare 401, each refusal counted, while everyone else is served."""

from __future__ import annotations

import secrets
import subprocess
import sys
import warnings

import pytest
import requests

from llmswarm import SwarmError
from llmswarm.config import ClientConfig
from llmswarm.sequence_manager import SwarmClient
from llmswarm_core.credentials import Authority, credential_id
from llmswarm_core.identity import ServerIdentity
from llmswarm_core.routemap import Announcement, ModelInfo, ServerRecord
from llmswarm_core.security import PlainCredentialWarning, sends_credential_in_clear
from llmswarm_local.swarm import _RouteMapThread
from llmswarm_node.span import SpanModel
from tests.bounds_harness import eventually, running
from tests.helpers import metric_total

MODEL = ModelInfo(name="smollm2", num_blocks=30, hidden_size=576)


@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 2, progress=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refusals(url: str, metric: str, reason: str) -> float:
    return metric_total(requests.get(f"{url}/metrics", timeout=10).text, metric, reason=reason)


def test_a_credential_in_the_clear_is_named() -> None:
    assert sends_credential_in_clear("http://203.0.113.5:8700", "t")
    assert sends_credential_in_clear("http://swarm.example:8700", "t")
    assert not sends_credential_in_clear("http://127.0.0.1:8700", "t")
    assert not sends_credential_in_clear("http://[::1]:8700", "t")
    assert not sends_credential_in_clear("http://localhost:8700", "t")
    assert not sends_credential_in_clear("https://203.0.113.5:8700", "t")
    assert not sends_credential_in_clear("http://203.0.113.5:8700", None)
    with pytest.warns(PlainCredentialWarning, match="203.0.113.5"):
        SwarmClient("http://203.0.113.5:9", ClientConfig(token="t", connect_timeout=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlainCredentialWarning)
        SwarmClient("http://127.0.0.1:9", ClientConfig(token="t"))


def test_roles_at_the_route_map_and_a_block_server(span, tmp_path) -> None:
    authority = Authority(ServerIdentity.generate())
    use, join, admin = (authority.issue(role, [role]) for role in ("use", "join", "admin"))
    server_credential = authority.issue("server-0", ["use", "join"])
    expired = authority.issue("old", ["use"], ttl_seconds=-60)
    forged = Authority(ServerIdentity.generate()).issue("forger", ["use", "join", "admin"])
    gateway_key = "sk-" + secrets.token_urlsafe(24)  # what the gateway's API keys look like
    thread = _RouteMapThread("127.0.0.1", 0, MODEL, authority_key=authority.public_key)
    map_url = f"http://127.0.0.1:{thread.port}"
    try:
        with running(span, swarm=map_url, server_id="server-0", token=server_credential,
                     authority_key=authority.public_key) as (url, _):
            # The server announced with its join credential and proved its address.
            eventually(lambda: any(s["state"] == "online" for s in requests.get(f"{map_url}/v1/routes", headers=bearer(use),
                                                                             timeout=10).json()["servers"]),
                       30, "server-0 online")
            client = SwarmClient(map_url, ClientConfig(token=use))
            assert [s.id for s in client.routes().servers] == ["server-0"]
            # use: routes, server RPCs. Not announcing, not administering.
            assert requests.get(f"{url}/info", headers=bearer(use), timeout=10).status_code == 200
            plain = Announcement(model=MODEL, server=ServerRecord(id="x", url="http://127.0.0.1:9", start=0, end=2,
                                                                  state="online"), ttl=10)
            body = plain.signed(ServerIdentity.generate()).model_dump(mode="json")
            assert requests.post(f"{map_url}/v1/servers", json=body, headers=bearer(use), timeout=10).status_code == 403
            assert requests.post(f"{map_url}/v1/admin/bans", json={"server_id": "server-0"}, headers=bearer(use),
                                 timeout=10).status_code == 403
            # join: announcing (the announcement is then checked on its own: listed as joining, never proven).
            assert requests.post(f"{map_url}/v1/servers", json=body, headers=bearer(join), timeout=10).status_code == 200
            assert requests.post(f"{url}/v1/forward", data=b"x", headers=bearer(join), timeout=10).status_code == 403
            # Credentials that prove nothing: a bare 401 at both, nothing about the swarm in it.
            for token in (gateway_key, expired, forged, "lsw1.e30.AAAA", ""):
                for response in (requests.get(f"{map_url}/v1/routes", headers=bearer(token), timeout=10),
                                 requests.get(f"{url}/info", headers=bearer(token), timeout=10)):
                    assert response.status_code == 401 and response.json() == {"error": "unauthorized"}
            # admin: ban an id (its announcements refused from then on), revoke a credential (refused at the route
            # map at once, at the block server once it has read the map again).
            ban = requests.post(f"{map_url}/v1/admin/bans", json={"server_id": "x"}, headers=bearer(admin), timeout=10)
            assert ban.status_code == 200 and ban.json() == {"banned": "x", "removed": True}
            assert requests.post(f"{map_url}/v1/servers", json=body, headers=bearer(join), timeout=10).status_code == 403
            for bad in ({"server_id": ""}, {"server_id": "a b"}, {"other": 1}):
                assert requests.post(f"{map_url}/v1/admin/bans", json=bad, headers=bearer(admin),
                                     timeout=10).status_code == 400
            revoked = requests.post(f"{map_url}/v1/admin/revocations", json={"credential_id": credential_id(use)},
                                    headers=bearer(admin), timeout=10)
            assert revoked.status_code == 200
            assert requests.get(f"{map_url}/v1/routes", headers=bearer(use), timeout=10).status_code == 401
            listed = requests.get(f"{map_url}/v1/routes", headers=bearer(server_credential), timeout=10).json()
            assert listed["revoked"] == [credential_id(use)]
            eventually(lambda: requests.get(f"{url}/info", headers=bearer(use), timeout=10).status_code == 401, 30,
                       "the block server to refuse the revoked credential")
            with pytest.raises(SwarmError):
                SwarmClient(map_url, ClientConfig(token=use)).routes()
            # Everyone else is still served; every refusal was counted.
            other_use = authority.issue("other", ["use"])
            assert requests.get(f"{url}/info", headers=bearer(other_use), timeout=10).status_code == 200
            assert requests.get(f"{map_url}/v1/routes", headers=bearer(other_use), timeout=10).status_code == 200
            assert refusals(map_url, "llmswarm_routemap_refusals_total", "role") >= 2
            assert refusals(map_url, "llmswarm_routemap_refusals_total", "credential") >= 6
            assert refusals(map_url, "llmswarm_routemap_refusals_total", "banned") == 1
            assert refusals(url, "llmswarm_auth_refusals_total", "role") == 1
            assert refusals(url, "llmswarm_auth_refusals_total", "credential") >= 6
    finally:
        thread.stop()


def test_credentials_cli_issues_what_the_authority_verifies(tmp_path) -> None:
    from llmswarm_core.credentials import Verifier

    key = tmp_path / "authority.pem"
    run = [sys.executable, "-m", "llmswarm_cli.main", "credentials"]
    public = subprocess.run([*run, "public-key", "--authority-file", str(key)], capture_output=True, text=True, check=True)
    issued = subprocess.run([*run, "issue", "--authority-file", str(key), "--name", "ada", "--roles", "use,join"],
                            capture_output=True, text=True, check=True)
    principal = Verifier(public.stdout.strip()).principal(f"Bearer {issued.stdout.strip()}")
    assert principal is not None and principal.name == "ada" and principal.roles == {"use", "join"}
    bad = subprocess.run([*run, "issue", "--authority-file", str(key), "--roles", "root"], capture_output=True, text=True)
    assert bad.returncode == 2 and "roles must be some of" in bad.stderr


def test_publications_belong_to_the_credential_that_made_them(smollm2) -> None:
    """With credentials, the publisher of an adapter is the credential's holder (no key to keep): only that holder
    or an admin replaces or deletes it (issue #17)."""
    from llmswarm.publish import upload_body
    from llmswarm_control.adapters import AdapterStore
    from llmswarm_core.lora import LoraSpec, model_block_modules
    from tests.test_adapter_publishing import peft_state

    authority = Authority(ServerIdentity.generate())
    ada, bob, admin = authority.issue("ada", ["use"]), authority.issue("bob", ["use"]), authority.issue("ops", ["admin"])
    shapes = model_block_modules(smollm2.config)[0]
    thread = _RouteMapThread("127.0.0.1", 0, ModelInfo(name="SmolLM2-135M-Instruct", num_blocks=30, hidden_size=576),
                             adapters=AdapterStore(shapes=shapes), authority_key=authority.public_key)
    url = f"http://127.0.0.1:{thread.port}/v1/adapters/shared"
    body = upload_body(peft_state(), LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]), "SmolLM2-135M-Instruct")

    def publish(token: str, replace: bool = False) -> requests.Response:
        return requests.post(url + ("?replace=1" if replace else ""), data=body, timeout=30,
                             headers={**bearer(token), "Content-Type": "application/octet-stream",
                                      "X-Llmswarm-Publisher": "someone-else"})
    try:
        created = publish(ada)
        assert created.status_code == 201 and created.json()["publisher"] == "ada"  # the credential's, not the header's
        assert publish(bob, replace=True).status_code == 403
        assert requests.delete(url, headers=bearer(bob), timeout=10).status_code == 403
        assert publish(ada, replace=True).status_code == 201
        assert requests.delete(url, headers=bearer(admin), timeout=10).json() == {"deleted": "shared"}
        assert requests.get(url, headers=bearer(ada), timeout=10).status_code == 404
        assert publish(bob).status_code == 201  # the name is free again
        assert requests.delete(url, headers=bearer(bob), timeout=10).status_code == 200
    finally:
        thread.stop()
