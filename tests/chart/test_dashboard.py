"""The Grafana dashboard (charts/llmswarm/dashboards/llmswarm.json).

- Every PromQL expression refers only to metrics the code exports: the metric names are read from the code
  (every prometheus_client Counter, Gauge, Histogram... named llmswarm_*), the names used from the dashboard.
- Every panel's queries return data from a real Prometheus (Debian's) that scrapes real local block servers,
  their route map, and the real operator (reconciling a Swarm in the Kubernetes API emulator), with the scrape
  configuration the chart's PodMonitor and ServiceMonitor give the Prometheus Operator.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmswarm_operator.manifests import desired_servers
from llmswarm_operator.swarm_spec import parse_spec, plan_placement
from tests.chart.cluster import audit, eventually, free_port, install_crds, operator_process, running_chart_cluster, swarm_phase
from tests.chart.conftest import OUTPUT
from tests.chart.rendering import CHART_DIR, PROMETHEUS_OPERATOR, RELEASE, ROOT, crd_documents, render

DASHBOARD = CHART_DIR / "dashboards" / "llmswarm.json"
CODE_DIRS = [ROOT / "client", ROOT / "node_image", ROOT / "operator"]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

SWARM_NAMESPACE = "llmswarm"  # where the Swarm and its servers are
OPERATOR_NAMESPACE = "llmswarm-system"  # where the chart (the operator) is: not the Swarm's, so honorLabels matters
SWARM = "smollm2-local"
RATE_INTERVAL = "15s"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']} / {t['refId']}", t) for p in panels() for t in p["targets"]]


# ---- metric names: the code's and the dashboard's ----------------------------------------------------------

SUFFIXES = {
    "Counter": ("_total", "_created"), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"), "Info": ("_info",), "Enum": ("",),
}


def exported_metrics() -> dict[str, str]:
    """Every series name the code can export, from its prometheus_client metric definitions: name -> file."""
    out: dict[str, str] = {}
    for directory in CODE_DIRS:
        for path in directory.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                kind = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                first = node.args[0]
                if kind in SUFFIXES and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    name = first.value.removesuffix("_total") if kind == "Counter" else first.value
                    for suffix in SUFFIXES[kind]:
                        out[name + suffix] = str(path.relative_to(ROOT))
    return out


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, variables inside them)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # grouping labels
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if not call and word.lower() not in KEYWORDS:
            names.add(word)
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, kind) (rate(llmswarm_request_duration_seconds_bucket{swarm="$swarm", '
            'kind="step"}[$__rate_interval]))) / on (instance) group_left() scalar(count(llmswarm_block_replicas > 0)) or vector(1)')
    assert metric_names(expr) == {"llmswarm_request_duration_seconds_bucket", "llmswarm_block_replicas"}
    assert metric_names("sum(rate(llmswarm_tokens_processed_total[1m])) * 2 + llmswarm_made_up") == {
        "llmswarm_tokens_processed_total", "llmswarm_made_up"}


def test_code_metric_names_are_read() -> None:
    exported = exported_metrics()
    # One of each kind, from each part: block server, route map, operator.
    for name in ("llmswarm_tokens_processed_total", "llmswarm_request_duration_seconds_bucket", "llmswarm_kv_cache_bytes_limit",
                 "llmswarm_block_replicas", "llmswarm_routemap_servers", "llmswarm_operator_reconciles_total", "llmswarm_swarm_ready"):
        assert name in exported, name
    assert "llmswarm_tokens_processed" not in exported  # a counter's series is ..._total


def test_every_dashboard_query_uses_only_metrics_the_code_exports() -> None:
    exported = exported_metrics()
    used: set[str] = set()
    expressions = [t["expr"] for _, t in targets()]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, LABEL)
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            expressions.append(match.group(1))
    for expr in expressions:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = sorted(n for n in names if n not in exported)
        assert unknown == [], f"{expr!r} uses metrics no code exports: {unknown}"
        used |= names
    # The panels: coverage per block, servers by state, tokens/s, latency percentiles, KV cache against its
    # limit, queue depth, active sessions, rebalance events; and the gateway's requests, tokens, time to first
    # token and inter-token latency.
    for name in ("llmswarm_gateway_requests_total", "llmswarm_gateway_tokens_total",
                 "llmswarm_gateway_time_to_first_token_seconds_bucket", "llmswarm_gateway_inter_token_latency_seconds_bucket",
                 "llmswarm_block_replicas", "llmswarm_routemap_servers", "llmswarm_tokens_processed_total",
                 "llmswarm_request_duration_seconds_bucket", "llmswarm_kv_cache_bytes_used", "llmswarm_kv_cache_bytes_limit",
                 "llmswarm_queue_depth", "llmswarm_active_sessions", "llmswarm_rebalance_rounds_total", "llmswarm_rebalance_moves_total"):
        assert name in used, name


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "llmswarm-overview" and board["title"] == "llmswarm"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert set(variables) == {"datasource", "namespace", "swarm"}
    bottom = 0
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        bottom = max(bottom, grid["y"] + grid["h"])
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # Panels do not overlap.
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    assert len(panels()) >= 20


# ---- against a real Prometheus ----------------------------------------------------------------------------------

def substitute(expr: str) -> str:
    """Grafana's variables as Grafana would expand them here (1 s scrapes; the dashboard's namespace and swarm)."""
    for name, value in (("$__rate_interval", RATE_INTERVAL), ("$__interval", RATE_INTERVAL), ("$__range", "10m"),
                        ("$namespace", SWARM_NAMESPACE), ("$swarm", SWARM)):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def relabel_config(relabeling: dict[str, Any]) -> dict[str, Any]:
    """A Prometheus Operator RelabelConfig in Prometheus' own configuration format."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label", "regex": "regex", "replacement": "replacement",
            "action": "action", "separator": "separator", "modulus": "modulus"}
    out = {keys[k]: v for k, v in relabeling.items()}
    if "action" in out:
        out["action"] = out["action"].lower()
    return out


def meta_label(pod_label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


def prometheus_config(rendered: Any, pods: list[tuple[str, dict[str, str]]], operator_target: str,
                      gateway_target: str) -> dict[str, Any]:
    """What the Prometheus Operator makes of the chart's PodMonitor and ServiceMonitor, with these targets in place of
    Kubernetes service discovery (its __meta_* labels given as the targets' labels) and 1 s scrapes."""
    # The Prometheus Operator adds the target's namespace as `namespace` to every target.
    namespace_label = {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}
    pod_monitor = rendered.get("PodMonitor")
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    swarms_job = {
        "job_name": f"podMonitor/{OPERATOR_NAMESPACE}/{pod_monitor['metadata']['name']}/0",
        "scrape_interval": "1s", "scrape_timeout": "1s", "metrics_path": endpoint["path"],
        "honor_labels": endpoint.get("honorLabels", False),
        "static_configs": [{"targets": [address], "labels": {"__meta_kubernetes_namespace": SWARM_NAMESPACE,
                                                             **{meta_label(k): v for k, v in labels.items()}}}
                           for address, labels in pods],
        "relabel_configs": [namespace_label, *(relabel_config(r) for r in endpoint["relabelings"])],
    }
    service_monitor = rendered.get("ServiceMonitor", f"{RELEASE}-operator")
    (endpoint,) = service_monitor["spec"]["endpoints"]
    operator_job = {
        "job_name": f"serviceMonitor/{OPERATOR_NAMESPACE}/{service_monitor['metadata']['name']}/0",
        "scrape_interval": "1s", "scrape_timeout": "1s", "metrics_path": endpoint["path"],
        "honor_labels": endpoint.get("honorLabels", False),
        "static_configs": [{"targets": [operator_target], "labels": {"__meta_kubernetes_namespace": OPERATOR_NAMESPACE}}],
        "relabel_configs": [namespace_label],
    }
    gateway_job = {  # the gateway's ServiceMonitor scrapes its Service's /metrics the same way
        "job_name": f"serviceMonitor/{OPERATOR_NAMESPACE}/{RELEASE}-gateway/0", "scrape_interval": "1s", "scrape_timeout": "1s",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [gateway_target], "labels": {"__meta_kubernetes_namespace": OPERATOR_NAMESPACE}}],
        "relabel_configs": [namespace_label],
    }
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [swarms_job, operator_job, gateway_job]}


def start_gateway(swarm_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """A real `llmswarm gateway` in front of the local swarm, ready to answer."""
    import requests

    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "llmswarm.gateway", "--swarm", swarm_url, "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        assert process.poll() is None and time.monotonic() < deadline, f"the gateway did not get ready: {log.read_text()[-2000:]}"
        time.sleep(0.3)


def ask_gateway(port: int) -> str:
    """One streamed chat completion through the gateway (tokens, time to first token, inter-token latency)."""
    import requests

    body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0, "stream": True}
    models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
    body["model"] = models["data"][0]["id"]
    with requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, stream=True, timeout=120) as response:
        response.raise_for_status()
        text = ""
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("delta", {}).get("content") or ""
    return text


class Prometheus:
    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = open(directory / "prometheus.log", "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
            assert body["status"] == "success", body
            return body["data"]


def generate(url: str) -> str:
    """Traffic through the swarm: a short generation first (labelled series start to exist: Prometheus counts no
    increase from a series' first sample), then, two scrapes later, the measured one."""
    from llmswarm import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=url, progress=False)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, return_tensors="pt")
    ids = ids if hasattr(ids, "shape") else ids["input_ids"]
    model.generate(ids, max_new_tokens=2, do_sample=False)
    time.sleep(2.5)
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return str(model.tokenizer.decode(out[0, ids.shape[-1]:]))


@pytest.mark.integration
@pytest.mark.timeout(240)
async def test_every_panel_returns_data_from_a_real_prometheus(local_swarm: Any, tmp_path: Path) -> None:
    assert Path(PROMETHEUS).exists(), "needs Prometheus: apt-get install -y prometheus (Debian's package)"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    rendered = render({"operator": {"clusterWide": True,  # the Swarm is in another namespace than the operator
                                    "settings": {"metricsPort": metrics_port, "metricsHost": "127.0.0.1", "livenessEndpoint": "",
                                                 "reconcileInterval": 0.5, "retryDelay": 0.5}},
                       "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}},
                      namespace=OPERATOR_NAMESPACE, api_versions=PROMETHEUS_OPERATOR)
    # The Swarm the local servers stand for: the same model and spans; its server names label their metrics.
    spec = {"model": {"source": "smollm2"}, "pools": [{"name": "cpu", "gpuMemory": "2Gi", "minServers": 2, "blocksPerServer": 15}]}
    _, _, placement = plan_placement(parse_spec(spec))
    names = {(s.span.start, s.span.end): s.name for s in desired_servers(SWARM, placement)}
    servers = local_swarm.routes().servers
    assert {(s.start, s.end) for s in servers} == set(names), "the local spans differ from the Swarm's placement"
    pods = [(s.url.removeprefix("http://"), {"llmswarm.dev/swarm": SWARM, "llmswarm.dev/pool": "cpu",
                                             "llmswarm.dev/server": names[(s.start, s.end)],
                                             "app.kubernetes.io/component": "block-server"}) for s in servers]
    pods.append((local_swarm.url.removeprefix("http://"), {"llmswarm.dev/swarm": SWARM, "app.kubernetes.io/component": "route-map"}))

    async with running_chart_cluster(tmp_path, SWARM_NAMESPACE) as (emulator, controllers, kubectl):
        await install_crds(emulator, kubectl, crd_documents())
        controllers.all_ready = True
        deployment = rendered.get("Deployment", f"{RELEASE}-operator")
        gateway_port = free_port()
        gateway = start_gateway(local_swarm.url, gateway_port, OUTPUT / "gateway-dashboard.log")
        config = prometheus_config(rendered, pods, f"127.0.0.1:{metrics_port}", f"127.0.0.1:{gateway_port}")
        (OUTPUT / "dashboard-prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        prometheus = Prometheus(tmp_path, config)
        try:
            async with operator_process(deployment, emulator, kubectl.kubeconfig, OUTPUT / "operator-dashboard.log"), \
                    aiohttp.ClientSession() as http:
                # The rebalancer reads the servers' load from this Prometheus (its rounds are the dashboard's
                # rebalance events).
                rebalance = {"enabled": True, "intervalSeconds": 10, "prometheusUrl": prometheus.url}
                swarm = {"apiVersion": "llmswarm.dev/v1alpha1", "kind": "Swarm", "metadata": {"name": SWARM},
                         "spec": {**spec, "rebalance": rebalance}}
                await kubectl.apply(yaml.safe_dump(swarm))
                await eventually(lambda: swarm_phase(kubectl, SWARM, "Ready"), 60, f"{SWARM} to be Ready")

                async def up() -> bool:
                    active = (await prometheus.api(http, "targets"))["activeTargets"]
                    assert len(active) == len(pods) + 2 and all(t["health"] == "up" for t in active), \
                        [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in active]
                    return True
                await eventually(up, 30, "Prometheus to scrape every target")
                start = time.time()
                answer = await asyncio.to_thread(generate, local_swarm.url)
                assert "Paris" in answer
                assert "Paris" in await asyncio.to_thread(ask_gateway, gateway_port)

                async def rebalanced() -> bool:
                    rounds = await prometheus.api(http, "query", query="llmswarm_rebalance_rounds_total")
                    assert rounds["result"], "no rebalance round yet"
                    return True
                await eventually(rebalanced, 40, "a rebalance round")
                await asyncio.sleep(3)  # a few scrapes after the traffic and the round
                report = await evaluate(prometheus, http, start - 20, time.time())
                status = (await kubectl.get_json("swarm", SWARM))["status"]
        finally:
            prometheus.stop()
            gateway.terminate()
            gateway.wait(30)
        audit(rendered, emulator, deployment, OUTPUT, "dashboard")  # the rebalancer's requests too
    (OUTPUT / "dashboard-queries.json").write_text(json.dumps(report, indent=1))
    empty = [name for name, result in report["targets"].items() if not result["finite"]]
    assert empty == [], f"panel queries with no data: {empty} (see test-output/chart/dashboard-queries.json)"
    assert report["variables"] == {"namespace": [SWARM_NAMESPACE], "swarm": [SWARM]}
    last = {name: result["last"] for name, result in report["targets"].items()}
    # What the data says is right, not only present.
    assert last["Coverage per block / A"] == {str(b): 1.0 for b in range(30)}
    assert last["Min replicas / A"] == {"": 1.0} and last["Target replicas / A"] == {"": 1.0}
    assert last["Uncovered blocks / A"] == {"": 0.0} and last["Ready / A"] == {"": 1.0}
    assert last["Servers by state / A"] == {"draining": 0.0, "joining": 0.0, "online": 2.0}
    assert last["Spans / A"] == {names[(0, 15)]: 0.0, names[(15, 30)]: 15.0}
    assert last["Spans / B"] == {names[(0, 15)]: 15.0, names[(15, 30)]: 30.0}
    peaks = {name: result["max"] for name, result in report["targets"].items()}
    assert set(peaks["Tokens/s per server / A"]) == set(names.values())
    assert all(v > 0 for v in peaks["Tokens/s per server / A"].values())
    assert all(v > 0 for v in peaks["Tokens/s per block / A"].values())
    assert 0 < peaks["Step latency percentiles / A"][""] <= peaks["Step latency percentiles / C"][""]
    assert all(v > 0 for v in last["KV cache bytes / B"].values())
    # The rebalance round the panel shows is the one the Swarm's status reports.
    result = status["rebalance"]["result"]
    assert result in report["targets"]["Rebalance events / A"]["last"], (result, report["targets"]["Rebalance events / A"])


async def evaluate(prometheus: Prometheus, http: aiohttp.ClientSession, start: float, end: float) -> dict[str, Any]:
    """Every panel query over [start, end] (range queries, 1 s steps), and the template variables."""
    report: dict[str, Any] = {"targets": {}, "variables": {}}
    for name, target in targets():
        expr = substitute(target["expr"])
        data = await prometheus.api(http, "query_range", query=expr, start=str(start), end=str(end), step="1")
        series = data["result"]
        values = [float(v) for s in series for _, v in s["values"]]
        legend = target.get("legendFormat", "")
        label = re.findall(r"\{\{(\w+)\}\}", legend)

        def key(metric: dict[str, str], label: list[str] = label) -> str:
            if label:  # as the legend names the series
                return " ".join(metric.get(k, "") for k in label)
            return " ".join(metric[k] for k in sorted(metric))

        report["targets"][name] = {
            "expr": expr, "series": len(series), "finite": sum(1 for v in values if math.isfinite(v)),
            "last": {key(s["metric"]): float(s["values"][-1][1]) for s in series},
            "max": {key(s["metric"]): max((float(v) for _, v in s["values"] if math.isfinite(float(v))), default=math.nan)
                    for s in series},
        }
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = substitute(match.group(1)), match.group(2)
        values = await prometheus.api(http, f"label/{label}/values", **{"match[]": selector})
        report["variables"][variable["name"]] = sorted(values)
    return report
