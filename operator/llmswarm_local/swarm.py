"""The local substrate: a route-map service plus block servers as local processes.

``llmswarm up`` and the integration tests use :class:`LocalSwarm`. Spans come from the
same placement function the Kubernetes operator uses. The servers it starts are
``local-N``, N their index in ``processes``; :meth:`LocalSwarm.move` gives a server a new span make-before-break (a
new process ``local-M`` on the new span, online before the old one drains), which is how
the rebalancer (:mod:`llmswarm_local.rebalancer`) acts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from tqdm.auto import tqdm

from llmswarm_control.adapters import AdapterStore
from llmswarm_control.placement import place_spans
from llmswarm_control.routemap_service import RelayOptions, RouteMapService
from llmswarm_core.defaults import DEFAULT_MODEL, ROUTE_MAP_PORT
from llmswarm_core.lora import model_block_modules
from llmswarm_core.routemap import ModelInfo, RouteMap
from llmswarm_core.security import TOKEN_ENV, server_ssl_context
from llmswarm_core.source import resolve
from llmswarm_core.spans import Span
from llmswarm_core.threads import shared_cores_env


class LocalSwarmError(RuntimeError):
    pass


@dataclass
class LocalSwarmOptions:
    model: str = DEFAULT_MODEL
    servers: int | None = 3
    redundancy: int = 1
    blocks_per_server: int | None = None
    host: str = "127.0.0.1"
    port: int = ROUTE_MAP_PORT  # route map; 0 picks a free port
    dtype: str = "float32"
    threads: int = 0  # torch threads per server (0: torch's default)
    server_args: list[str] = field(default_factory=list)  # extra `llmswarm serve` arguments
    log_dir: Path | None = None
    start_timeout: float = 300.0
    progress: bool = True
    token: str | None = None  # swarm token for the route map and every server
    tls_cert: str | None = None  # serve the route map and the servers over HTTPS
    tls_key: str | None = None
    tls_ca: str | None = None  # CA bundle the servers use to verify the route map
    authority_key: str | None = None  # credentials signed by this key are checked for their roles (credentials.py)
    relay: bool = False  # the route map relays: servers behind NAT attach, outside clients reach every server through it
    server_host: str | None = None  # the servers' listening address (default: `host`; 127.0.0.1 keeps them private)


class _RouteMapThread:
    """The route-map service on its own event loop in a background thread."""

    def __init__(self, host: str, port: int, model: ModelInfo, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, adapters: AdapterStore | None = None,
                 tls_ca: str | None = None, authority_key: str | None = None, relay: bool = False) -> None:
        self.service = RouteMapService.announcements(model, token=token, adapters=adapters, tls_ca=tls_ca,
                                                     authority_key=authority_key,
                                                     relay=RelayOptions() if relay else None)
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, args=(host, port), name="routemap", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise LocalSwarmError(f"route map cannot listen on {host}:{port}: {self._error}") from self._error

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main(host, port))

    async def _main(self, host: str, port: int) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.service.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=self._ssl).start()
        except OSError as error:
            self._error = error
            self._ready.set()
            await runner.cleanup()
            return
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class LocalSwarm:
    """Start with ``with LocalSwarm(options) as swarm: swarm.url``."""

    def __init__(self, options: LocalSwarmOptions | None = None) -> None:
        self.options = options or LocalSwarmOptions()
        # One entry per server process ever started, in order (the swarm names its own `local-<index>`).
        self.spans: list[Span] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_files: list[Path] = []
        self.server_ids: list[str] = []
        self.retired: set[int] = set()  # servers moved away (draining, then gone)
        self.num_blocks = 0
        self.log_dir: Path | None = None
        self._routemap: _RouteMapThread | None = None
        self._identities: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()
        self.url = ""

    def start(self) -> LocalSwarm:
        o = self.options
        source = resolve(o.model, progress=o.progress)  # convert once here, not in every server
        spans = place_spans(source.num_blocks, o.servers, o.redundancy, o.blocks_per_server)
        self.num_blocks = source.num_blocks
        model = ModelInfo(name=source.name, num_blocks=source.num_blocks, hidden_size=int(source.config.hidden_size))
        context = server_ssl_context(o.tls_cert, o.tls_key)
        # Published adapters are checked against the model's own block modules (adapters.py)
        adapters = AdapterStore(shapes=model_block_modules(source.config)[0])
        self._routemap = _RouteMapThread(o.host, o.port, model, o.token, context, adapters, o.tls_ca, o.authority_key,
                                         o.relay)
        self.url = f"{'https' if context else 'http'}://{o.host}:{self._routemap.port}"
        self.log_dir = o.log_dir or Path(tempfile.mkdtemp(prefix="llmswarm-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Each server's key (its announcements are signed): kept while the swarm runs, so that a restarted
        # `local-N` speaks for its id again; removed with the swarm.
        self._identities = tempfile.TemporaryDirectory(prefix="llmswarm-identities-")
        for index, span in enumerate(spans):
            self.start_server(span, self.log_dir / f"server-{index}-{span.start}-{span.end}.log", f"local-{index}")
        self.wait_online(len(spans))
        return self

    @property
    def registry(self) -> CollectorRegistry:
        """The route-map service's metrics registry (what its ``/metrics`` serves)."""
        assert self._routemap is not None, "the swarm is not started"
        return self._routemap.service.registry

    def start_server(self, span: Span, log_file: Path, server_id: str) -> subprocess.Popen[bytes]:
        o = self.options
        command = [
            sys.executable, "-m", "llmswarm_node.main", "--model", o.model, "--blocks", str(span),
            "--host", o.server_host or o.host, "--port", "0", "--swarm", self.url, "--server-id", server_id,
            "--identity-file", str(self.identity_file(server_id)),
            "--dtype", o.dtype, "--quiet", *o.server_args,
        ]
        if o.threads:
            command += ["--threads", str(o.threads)]
        if o.tls_cert and o.tls_key:
            command += ["--tls-cert", o.tls_cert, "--tls-key", o.tls_key]
        if o.tls_ca:
            command += ["--tls-ca", o.tls_ca]
        if o.authority_key:
            command += ["--authority-key", o.authority_key]
        env = {**os.environ, **shared_cores_env(os.environ), "TOKENIZERS_PARALLELISM": "false"}
        if o.token:
            env[TOKEN_ENV] = o.token  # not on the command line, where `ps` would show it
        with self._lock:
            with open(log_file, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            self.processes.append(process)
            self.log_files.append(log_file)
            self.spans.append(span)
            self.server_ids.append(server_id)
        return process

    def identity_file(self, server_id: str) -> Path:
        """Where server `server_id` keeps its key while the swarm runs."""
        assert self._identities is not None, "the swarm is not started"
        return Path(self._identities.name) / f"{server_id}.pem"

    def index_of(self, server_id: str) -> int:
        """The newest process started under `server_id`."""
        for index in range(len(self.server_ids) - 1, -1, -1):
            if self.server_ids[index] == server_id:
                return index
        raise KeyError(f"no server {server_id!r} in this swarm")

    def move(self, index: int, span: Span, timeout: float | None = None) -> int:
        """Give server `index` the span `span`, make-before-break; returns the index of its replacement.

        A new process (``local-<new index>``) loads `span` and must be ``online`` in the route
        map before the old one gets SIGTERM: the old one then drains (it turns ``draining``,
        refuses new sessions, lets open ones finish within ``--drain-timeout``) and exits. If the
        new one fails to start, it is stopped and the old one keeps serving.
        """
        if index in self.retired or self.processes[index].poll() is not None:
            raise LocalSwarmError(f"server {self.server_ids[index]} is not running")
        if span.end > self.num_blocks:
            raise LocalSwarmError(f"span {span} is outside the model's {self.num_blocks} blocks")
        assert self.log_dir is not None, "the swarm is not started"
        new_index = len(self.processes)
        log_file = self.log_dir / f"server-{new_index}-{span.start}-{span.end}.log"
        process = self.start_server(span, log_file, f"local-{new_index}")
        try:
            self.wait_server(new_index, timeout if timeout is not None else self.options.start_timeout)
        except LocalSwarmError:
            self.retired.add(new_index)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            raise
        self.retired.add(index)
        self.processes[index].send_signal(signal.SIGTERM)  # drain: open sessions finish, new ones go elsewhere
        return new_index

    def wait_server(self, index: int, timeout: float) -> None:
        """Until server `index` is online in the route map; raises if its process exits or time runs out."""
        server_id, process, log = self.server_ids[index], self.processes[index], self.log_files[index]
        deadline = time.monotonic() + timeout
        while not any(s.id == server_id and s.state == "online" for s in self.routes().servers):
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise LocalSwarmError(f"server {server_id} exited with {process.returncode}; its log ({log}):\n{tail}")
            if time.monotonic() > deadline:
                raise LocalSwarmError(f"server {server_id} was not online after {timeout:.0f} s")
            time.sleep(0.2)

    def routes(self) -> RouteMap:
        """The route map as the service publishes it (read in-process; safe from any thread)."""
        assert self._routemap is not None, "the swarm is not started"
        return self._routemap.service.published

    def wait_online(self, count: int) -> None:
        deadline = time.monotonic() + self.options.start_timeout
        with tqdm(total=count, desc="block servers online", unit="server", disable=not self.options.progress) as bar:
            while True:
                online = sum(1 for s in self.routes().servers if s.state == "online")
                bar.update(online - bar.n)
                if online >= count:
                    return
                for index, (process, log) in enumerate(zip(self.processes, self.log_files, strict=True)):
                    if index not in self.retired and process.poll() is not None:
                        tail = log.read_text(errors="replace")[-2000:]
                        self.stop()
                        raise LocalSwarmError(f"a block server exited with {process.returncode}; its log ({log}):\n{tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise LocalSwarmError(f"only {online} of {count} servers online after {self.options.start_timeout} s")
                time.sleep(0.2)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.processes[index].send_signal(sig)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._routemap is not None:
            self._routemap.stop()
            self._routemap = None
        if self._identities is not None:
            self._identities.cleanup()
            self._identities = None

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
