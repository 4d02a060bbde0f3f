"""The route map learns of the operator's record through the Kubernetes API within a second, not when the kubelet
refreshes the mounted ConfigMap (a minute or more): a server the operator deleted is never listed from a stale file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from llmswarm_control.routemap_service import ConfigMapRef, RouteMapService, build_parser
from llmswarm_core.routemap import ModelInfo, RouteMap, ServerRecord
from llmswarm_operator import manifests as m
from llmswarm_operator.kubeapi import KubeClient
from llmswarm_operator.settings import OperatorSettings
from llmswarm_operator.swarm_spec import parse_spec
from tests.operator.cluster import running_cluster
from tests.operator.conftest import Cluster, Operator, eventually
from tests.operator.test_routemap_service import announce, get_routes, serving, unchecked

MODEL = ModelInfo(name="SmolLM2-135M-Instruct", num_blocks=30, hidden_size=576)
NAME = "demo-routemap"


def record(server_id: str, start: int, end: int, state: str) -> ServerRecord:
    return ServerRecord(id=server_id, url=f"http://{server_id}:8701", start=start, end=end, state=state)  # type: ignore[arg-type]


def routes(version: int, *servers: ServerRecord) -> str:
    return RouteMap(model=MODEL, version=version, servers=list(servers)).model_dump_json()


def configmap(text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME, "namespace": "default"},
            "data": {m.ROUTES_FILE: text}}


A, B = record("a", 0, 15, "online"), record("b", 15, 30, "online")
B2 = record("b2", 15, 30, "online")


async def test_the_api_record_wins_over_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    first = routes(3, A, B)
    path.write_text(first)  # what the kubelet mounted, and will not refresh for a minute
    async with running_cluster(tmp_path) as (_, url, _, _):
        kube = KubeClient()
        kube.use(kopf.ConnectionInfo(server=url))
        try:
            await kube.create(configmap(first))
            service = RouteMapService.from_record(path, interval=0.05, configmap=ConfigMapRef(url, "default", NAME),
                                                  identities=unchecked())
            async with serving(service) as base, aiohttp.ClientSession() as http:
                assert {s.id for s in (await get_routes(http, base)).servers} == {"a", "b"}
                # The rollout: b2 joins and comes online, b drains, then the operator deletes b.
                for version, servers in ((4, (A, B, B2)), (5, (A, record("b", 15, 30, "draining"), B2)), (6, (A, B2))):
                    await kube.patch("ConfigMap", "default", NAME, {"data": {m.ROUTES_FILE: routes(version, *servers)}})

                async def dropped() -> RouteMap:
                    current = await get_routes(http, base)
                    assert {s.id for s in current.servers} == {"a", "b2"}, current.servers
                    return current
                current = await eventually(dropped, 3, "the route map to drop the deleted server")
                assert current.version >= 6
                # b is still up and announcing: never listed again, whatever the stale file says.
                status, body = await announce(http, base, B)
                assert status == 200 and body["listed"] is False
                await asyncio.sleep(0.5)  # ten reloads of the stale file
                assert {s.id for s in (await get_routes(http, base)).servers} == {"a", "b2"}
                # The kubelet's late sync brings an older record (b still there): it does not win either.
                path.write_text(routes(4, A, B, B2))
                await asyncio.sleep(0.3)
                assert {s.id for s in (await get_routes(http, base)).servers} == {"a", "b2"}
                # The file catching up changes nothing.
                path.write_text(routes(6, A, B2))
                await asyncio.sleep(0.2)
                assert (await get_routes(http, base)).version == current.version
        finally:
            await kube.close()


async def test_without_the_api_the_file_still_serves(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(routes(3, A, B))
    # An API server that is not there: the watch keeps retrying, the file is served meanwhile.
    service = RouteMapService.from_record(path, interval=0.05, configmap=ConfigMapRef("http://127.0.0.1:9", "default", NAME))
    async with serving(service) as base, aiohttp.ClientSession() as http:
        assert {s.id for s in (await get_routes(http, base)).servers} == {"a", "b"}
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200


# ---- what the operator builds for it -------------------------------------------------------------------------------

OWNER = m.Owner("demo", "llm", "0a1b2c3d-0000-0000-0000-000000000000")
SETTINGS = OperatorSettings(image="ghcr.io/llmswarm/node:test")


def spec() -> Any:
    return parse_spec(yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "swarm-cpu.yaml").read_text())["spec"])


def test_the_route_map_pod_watches_its_configmap_with_its_own_account() -> None:
    deployment = m.routemap_deployment(OWNER, spec(), SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.configmap == m.routemap_name("demo") and args.routes is not None  # the API first, the file as a fallback
    assert pod["serviceAccountName"] == m.routemap_name("demo") and pod["automountServiceAccountToken"] is True
    account, role, binding = m.routemap_access(OWNER)
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == pod["serviceAccountName"]
    assert account["automountServiceAccountToken"] is False  # only this pod mounts it
    # Least privilege: read and watch that one ConfigMap, nothing else.
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [m.routemap_name("demo")],
                              "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "llm"}]
    for obj in (account, role, binding):
        assert obj["metadata"]["ownerReferences"] == [OWNER.reference()]


async def test_the_operator_gives_each_route_map_its_access(cluster: Cluster, operator: Operator) -> None:
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "swarm-cpu.yaml").read_text())
    name = doc["metadata"]["name"]
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def granted() -> bool:
        kinds = {plural: [o for o in cluster.controllers.live(plural) if o["metadata"]["name"] == m.routemap_name(name)]
                 for plural in ("serviceaccounts", "roles", "rolebindings")}
        assert all(len(found) == 1 for found in kinds.values()), kinds
        return True
    await eventually(granted, 15, "the route map's ServiceAccount, Role and RoleBinding")
    role = next(o for o in cluster.controllers.live("roles") if o["metadata"]["name"] == m.routemap_name(name))
    assert json.dumps(role["rules"]) == json.dumps(m.routemap_access(m.Owner(name, "default", "x"))[1]["rules"])


@pytest.mark.parametrize("given", [None, "other"])
def test_the_namespace_comes_from_the_service_account(tmp_path: Path, given: str | None) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text("team")
    (account / "token").write_text("t0ken\n")
    ref = ConfigMapRef.in_cluster(NAME, given, account_dir=account, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                                                                            "KUBERNETES_SERVICE_PORT": "443"})
    assert ref.namespace == (given or "team") and ref.server == "https://10.0.0.1:443" and ref.token() == "t0ken"
