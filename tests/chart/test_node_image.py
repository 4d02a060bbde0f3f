"""node_image/Dockerfile, checked without a Docker engine: its stages and variants, and that what it runs exists.

The wheel is built here from exactly what the Dockerfile's first stage copies; its entrypoint, command and
healthcheck are run against the installed package and a live block server.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmswarm_operator.manifests import CACHE_DIR
from tests.chart.crd_schema import crd_spec_schema
from tests.chart.rendering import CHART_DIR, ROOT

DOCKERFILE = ROOT / "node_image" / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {instruction}"
        return found[0]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions (continuations joined, comments dropped), global ARGs (before the first FROM), and stages."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.strip().startswith("#") and not current.strip():
            continue
        if line.strip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, entry
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM: {entry}"
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append((instruction, args.strip()))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not the exec (JSON) form: {args}"
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def healthcheck(stage: Stage) -> list[str]:
    args = stage.one("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert re.fullmatch(r"(--[a-z-]+=\S+\s*)*", options), options
    return exec_form(command)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_stages_cuda_by_default_cpu_as_a_build_argument(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["VARIANT"] == "cuda"
    assert dockerfile.global_args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in dockerfile.global_args["CUDA_IMAGE"]
    names = [s.name for s in dockerfile.stages]
    assert names == ["wheel", "base-cuda", "base-cpu", "venv", "runtime"]
    assert dockerfile.stage("base-cuda").base == "${CUDA_IMAGE}" and dockerfile.stage("base-cpu").base == "${CPU_IMAGE}"
    assert dockerfile.stage("venv").base == dockerfile.stage("runtime").base == "base-${VARIANT}"
    for variant, index in (("cuda", r"/whl/cu\d+$"), ("cpu", r"/whl/cpu$")):
        (arg,) = [a for a in dockerfile.stage(f"base-{variant}").all("ARG") if a.startswith("TORCH_INDEX_URL=")]
        assert re.search(index, arg), arg
    # Torch is the project's pinned version; the runtime stage copies the environment, not the build tools.
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and f"TORCH_VERSION={pinned.group(1)}" in dockerfile.stage("venv").all("ARG")
    runtime = dockerfile.stage("runtime")
    assert runtime.all("COPY") == ["--from=venv /opt/llmswarm /opt/llmswarm"]
    assert dockerfile.stages[-1] is runtime  # the default target


def test_runtime_runs_as_the_charts_non_root_user_with_a_cache_volume(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stage("runtime")
    user = runtime.one("USER")
    uid, _, gid = user.partition(":")
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podSecurityContext"]
    assert (int(uid), int(gid)) == (values["runAsUser"], values["runAsGroup"]) and int(uid) != 0
    run = " ".join(runtime.all("RUN"))
    assert f"--uid {uid}" in run and f"--gid {gid}" in run and f"chown {uid}:{gid} {CACHE_DIR}" in run
    assert exec_form(runtime.one("VOLUME")) == [CACHE_DIR]  # where the operator mounts the servers' cache
    env = env_of(runtime)
    assert env["LLMSWARM_CACHE"] == CACHE_DIR and env["HF_HOME"].startswith(CACHE_DIR + "/")
    assert env["PATH"].startswith("/opt/llmswarm/bin:")


def wheel_context(dockerfile: Dockerfile, directory: Path) -> Path:
    """The files the wheel stage copies, laid out as its COPY instructions say."""
    stage = dockerfile.stage("wheel")
    context = directory / "src"
    context.mkdir()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for copy in stage.all("COPY"):
        *sources, destination = copy.split()
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in sources:
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"
            path = ROOT / source
            target = context / destination / path.name if into_directory else context / destination
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return context


@pytest.fixture(scope="module")
def wheel(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    directory = tmp_path_factory.mktemp("wheel")
    context = wheel_context(dockerfile, directory)
    (run,) = dockerfile.stage("wheel").all("RUN")
    assert run.startswith("pip wheel") and run.endswith(" .")
    out = directory / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), "."],
                   cwd=context, check=True, capture_output=True)
    (built,) = out.glob("llmswarm-*.whl")
    return zipfile.ZipFile(built)


def test_the_project_installs_as_one_wheel_with_every_package(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for module in ("llmswarm_cli/main.py", "llmswarm_node/main.py", "llmswarm_operator/__main__.py", "llmswarm_control/routemap_service.py",
                   "llmswarm/gateway/__main__.py", "llmswarm/gateway/static/index.html"):
        assert module in names, f"{module} is not in the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "llmswarm = llmswarm_cli.main:main" in wheel.read(entry_points).decode()


def test_entrypoint_and_command_are_a_real_llmswarm_serve(dockerfile: Dockerfile, wheel: zipfile.ZipFile) -> None:
    from llmswarm_cli.main import build_parser

    runtime = dockerfile.stage("runtime")
    entrypoint, command = exec_form(runtime.one("ENTRYPOINT")), exec_form(runtime.one("CMD"))
    assert entrypoint == ["llmswarm", "serve"]
    # `llmswarm` is the wheel's console script, installed on PATH (/opt/llmswarm/bin).
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    scripts = dict(line.split(" = ") for line in wheel.read(entry_points).decode().splitlines() if " = " in line)
    assert entrypoint[0] in scripts
    args = build_parser().parse_args([*entrypoint[1:], *command])
    assert args.command == "serve" and args.blocks == (0, 30) and args.host == "0.0.0.0"
    default_port = crd_spec_schema()["properties"]["server"]["properties"]["port"]["default"]
    assert args.port == default_port == int(env_of(runtime)["LLMSWARM_HEALTHCHECK_PORT"])
    exposed = {int(p) for p in runtime.one("EXPOSE").split()}
    assert {default_port, 8700, 8080} <= exposed  # block server, route map (routeMap.port), gateway
    # What the chart and the operator run in the same image exists in the wheel too.
    names = set(wheel.namelist())
    assert "llmswarm_operator/__main__.py" in names and "llmswarm_control/routemap_service.py" in names


def run_healthcheck(command: list[str], port: int) -> subprocess.CompletedProcess[bytes]:
    assert command[0] == "python"
    env = {**os.environ, "LLMSWARM_HEALTHCHECK_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False)


def test_healthcheck_fails_when_nothing_answers(dockerfile: Dockerfile) -> None:
    import socket

    command = healthcheck(dockerfile.stage("runtime"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = run_healthcheck(command, port)
    assert result.returncode != 0 and b"Connection refused" in result.stderr


@pytest.mark.integration
def test_healthcheck_passes_against_a_live_block_server(dockerfile: Dockerfile, local_swarm: Any) -> None:
    command = healthcheck(dockerfile.stage("runtime"))
    for server in local_swarm.routes().servers:
        port = int(server.url.rsplit(":", 1)[1])
        result = run_healthcheck(command, port)
        assert result.returncode == 0, result.stderr.decode()


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "test-output"} <= ignored
    for needed in ("pyproject.toml", "README.md", "client", "node_image", "operator"):
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed
