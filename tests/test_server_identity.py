"""Server identities (issue #16) on real block servers: each signs its announcements with its own key, proves its
address to the route map, keeps its key across restarts, and cannot take over another server's id."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from llmswarm_core.identity import ServerIdentity, id_of
from llmswarm_core.routemap import IdentityProof, ModelInfo, RouteMap
from llmswarm_local.swarm import _RouteMapThread
from llmswarm_node.span import SpanModel
from tests.bounds_harness import eventually, running
from tests.helpers import metric_total

MODEL = ModelInfo(name="smollm2", num_blocks=30, hidden_size=576)  # what the harness's servers announce


@pytest.fixture(scope="module")
def span(smollm2):
    return SpanModel(smollm2, 0, 2, progress=False)


@contextmanager
def route_map() -> Iterator[_RouteMapThread]:
    """The route-map service with its defaults (signed announcements only, addresses checked)."""
    thread = _RouteMapThread("127.0.0.1", 0, MODEL)
    try:
        yield thread
    finally:
        thread.stop()


def routes(url: str) -> RouteMap:
    return RouteMap.model_validate(requests.get(f"{url}/v1/routes", timeout=10).json())


def states(url: str) -> dict[tuple[str, str], str]:
    return {(s.id, s.url): s.state for s in routes(url).servers}


def test_identity_answers_a_challenge_with_the_servers_key_and_refuses_bad_ones(span) -> None:
    with running(span) as (url, server):
        node = server.node
        assert node.id == id_of(node.identity.public_key)  # without --server-id, the id is the key's
        challenge = secrets.token_urlsafe(24)
        reply = requests.get(f"{url}/v1/identity", params={"challenge": challenge}, timeout=10)
        assert reply.status_code == 200
        proof = IdentityProof.model_validate(reply.json())
        proof.check(challenge, node.id, url, node.identity.public_key)  # raises where it does not prove it
        for bad in ("", "short", "x" * 129, "not base64url!" * 2):
            refused = requests.get(f"{url}/v1/identity", params={"challenge": bad}, timeout=10)
            assert refused.status_code == 400 and "challenge" in refused.json()["error"]
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_signed_servers_prove_their_address_keep_their_key_and_cannot_be_hijacked(span, tmp_path) -> None:
    key_file = tmp_path / "keys" / "server-0.pem"
    with route_map() as service_thread:
        map_url = f"http://127.0.0.1:{service_thread.port}"
        service = service_thread.service
        with running(span, swarm=map_url, server_id="server-0", identity_file=str(key_file)) as (url, server):
            eventually(lambda: states(map_url).get(("server-0", url)) == "online", 30, "server-0 online")
            key = server.node.identity.public_key
            assert service.identities.keys["server-0"] == key
            assert ("server-0", url, key) in service.identities.proven
            assert os.stat(key_file).st_mode & 0o777 == 0o600
            # Another process with the same id but its own key: every announcement of it is refused as a hijack,
            # and the map keeps listing the real server-0 at its own address only.
            with running(span, swarm=map_url, server_id="server-0"):
                eventually(lambda: metric_total(requests.get(f"{map_url}/metrics", timeout=10).text,
                                                "llmswarm_routemap_refusals_total", reason="hijack") >= 2,
                           30, "the thief's announcements refused")
                assert states(map_url) == {("server-0", url): "online"}
        # Stopped, it left with its own signature; restarted with its key file, it is server-0 again.
        eventually(lambda: not routes(map_url).servers, 10, "server-0 gone")
        assert ServerIdentity.load_or_create(key_file).public_key == key
        with running(span, swarm=map_url, server_id="server-0", identity_file=str(key_file)) as (url, server):
            assert server.node.identity.public_key == key
            eventually(lambda: states(map_url).get(("server-0", url)) == "online", 30, "server-0 online again")
