"""Each block server's key (issue #16) lives in a Secret the operator makes once: mounted read-only into every pod
of the server, never rewritten (a new key would be a new identity, refused by the route map), deleted with it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from llmswarm_core.identity import ServerIdentity
from llmswarm_operator import manifests as m
from tests.operator.conftest import Cluster, Operator, eventually
from tests.operator.test_pod_hardening import example


def live(cluster: Cluster, plural: str, swarm: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in cluster.controllers.live(plural)
            if o["metadata"].get("labels", {}).get(m.LABEL_SWARM) == swarm}


async def test_every_server_gets_its_own_key_once_and_loses_it_with_the_server(cluster: Cluster, operator: Operator,
                                                                            tmp_path: Path) -> None:
    doc = example("swarm-cpu.yaml")
    name = doc["metadata"]["name"]
    doc["spec"]["pools"][0]["maxServers"] = 6
    cluster.controllers.all_ready = True
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def servers_with_keys() -> tuple[dict[str, Any], dict[str, Any]]:
        deployments = {n: d for n, d in live(cluster, "deployments", name).items()
                       if d["metadata"]["labels"].get("app.kubernetes.io/component") == m.COMPONENT_SERVER}
        keys = live(cluster, "secrets", name)
        assert len(deployments) == 3 and {m.identity_secret_name(n) for n in deployments} <= set(keys), (deployments, keys)
        return deployments, keys
    deployments, keys = await eventually(servers_with_keys, what="three servers, each with its key")
    swarm = await cluster.kubectl.get_json("swarm", name)
    public_keys = set()
    for server, deployment in deployments.items():
        secret = keys[m.identity_secret_name(server)]
        assert secret["metadata"]["ownerReferences"][0]["uid"] == swarm["metadata"]["uid"]
        key_file = tmp_path / f"{server}.pem"
        key_file.write_bytes(base64.b64decode(secret["data"][m.IDENTITY_KEY]))
        public_keys.add(ServerIdentity.load_or_create(key_file).public_key)  # an Ed25519 key, as the server reads it
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        volume = next(v for v in pod["volumes"] if v["name"] == "identity")
        assert volume["secret"] == {"secretName": m.identity_secret_name(server), "defaultMode": 0o440}
        assert {"name": "identity", "mountPath": m.IDENTITY_DIR, "readOnly": True} in container["volumeMounts"]
        args = container["args"]
        assert args[args.index("--identity-file") + 1] == f"{m.IDENTITY_DIR}/{m.IDENTITY_KEY}"
    assert len(public_keys) == 3  # one key per server

    # A change that rewrites every Deployment leaves every key as it was.
    data = {n: s["data"] for n, s in keys.items()}
    doc["spec"]["server"] = {"extraArgs": ["--max-sessions", "7"]}
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def rolled() -> bool:
        deployments = live(cluster, "deployments", name)
        assert all("7" in d["spec"]["template"]["spec"]["containers"][0]["args"] for n, d in deployments.items()
                   if n in keys or m.identity_secret_name(n) in keys)
        return True
    await eventually(rolled, what="the Deployments rewritten")
    assert {n: s["data"] for n, s in live(cluster, "secrets", name).items()} == data

    # Fewer servers: the one removed takes its key with it.
    doc["spec"]["pools"][0].update(minServers=2, maxServers=2)
    doc["spec"]["redundancy"] = 1
    await cluster.kubectl.apply(yaml.safe_dump(doc))

    async def two_keys() -> bool:
        servers = {n for n, d in live(cluster, "deployments", name).items()
                   if d["metadata"]["labels"].get("app.kubernetes.io/component") == m.COMPONENT_SERVER}
        assert len(servers) == 2 and set(live(cluster, "secrets", name)) == {m.identity_secret_name(n) for n in servers}
        return True
    await eventually(two_keys, 30, what="two servers and their two keys")
