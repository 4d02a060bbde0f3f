"""Soak: sessions keep generating while servers are killed and restarted and bad clients misbehave.

    python bench/soak.py [--seconds 120] [--sessions 32] [--new-tokens 12] [--kill-every 20]

A local swarm of 4 servers, each span held twice (blocks [0, 15) and [15, 30), redundancy 2),
so that a killed server's blocks are still served while it restarts. For ``--seconds``:

- ``--sessions`` threads generate greedily through one client (their steps share the servers'
  passes), each output compared with local transformers' output for the same prompt, computed
  before the soak starts: ``generations_different`` must be 0;
- every ``--kill-every`` seconds a server is SIGKILLed and a replacement for its span started;
- a misbehaving client fires malformed frames (garbage, huge header integers, unknown kinds,
  truncated tensors) and oversized requests (declared sizes past the limits, too many tokens) at
  random servers, and counts how each was refused (its error code or HTTP status; a connection
  that dropped or hung is counted as such, which is a defect, unless the soak had SIGKILLed that
  server: ``KILLED_MID_REQUEST``);
- idle connections are opened (half an HTTP header; WebSocket sessions that never send) and
  held: the servers should close them (``idle_closed_by_server``).

Prints one JSON object: generations completed, different from local (must be 0), failed,
server restarts, refusals by kind, idle connections opened and closed by the servers, and the
peak resident memory of each server process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from llmswarm import DistributedModelForCausalLM
from llmswarm_core import wire
from llmswarm_local.swarm import LocalSwarm, LocalSwarmOptions

PROMPTS = [
    "What is the capital of France?", "Name a primary color.", "How many legs does a spider have?",
    "What is 2 + 2?", "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What is ice made of?",
]


def chat_ids(tokenizer: object, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,  # type: ignore[attr-defined]
                                        return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def expected_outputs(model_dir: Path, tokenizer: object, new_tokens: int) -> dict[str, list[int]]:
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        with torch.no_grad():
            out[prompt] = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                         do_sample=False)[0].tolist()
    return out


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = 0.0
        self.lock = threading.Lock()
        self.completed = 0
        self.different = 0
        self.failed: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.restarts = 0
        self.idle_opened = 0
        self.idle_closed = 0
        self.peak_rss: dict[str, int] = {}
        self.killed_urls: set[str] = set()  # servers the soak SIGKILLed: a request cut by the kill is no defect
        self.rng = random.Random(args.seed)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    # ---- sessions ---------------------------------------------------------------------------------------------
    def generate_forever(self, model: DistributedModelForCausalLM, expected: dict[str, list[int]], seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            prompt = rng.choice(PROMPTS)
            ids = chat_ids(model.tokenizer, prompt)
            try:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.new_tokens,
                                     do_sample=False)[0].tolist()
            except Exception as error:  # noqa: BLE001 - counted: a generation that failed is reported, not hidden
                with self.lock:
                    self.failed[type(error).__name__] += 1
                continue
            with self.lock:
                self.completed += 1
                self.different += out != expected[prompt]

    # ---- chaos: kill and restart ----------------------------------------------------------------------------------
    def kill_and_restart(self, swarm: LocalSwarm) -> None:
        while self.running():
            time.sleep(self.args.kill_every)
            if not self.running():
                return
            live = [i for i, p in enumerate(swarm.processes) if p.poll() is None and i not in swarm.retired]
            victim = self.rng.choice(live)
            span = swarm.spans[victim]
            urls = [s.url for s in swarm.routes().servers if s.id == swarm.server_ids[victim]]
            with self.lock:
                self.killed_urls.update(urls)  # a request to it that drops from now on was cut by the kill
            swarm.kill(victim, signal.SIGKILL)
            swarm.retired.add(victim)
            index = len(swarm.processes)
            assert swarm.log_dir is not None
            swarm.start_server(span, swarm.log_dir / f"server-{index}-{span.start}-{span.end}.log", f"local-{index}")
            try:
                swarm.wait_server(index, 300)
            except Exception as error:  # noqa: BLE001 - reported in the output
                with self.lock:
                    self.failed[f"restart: {type(error).__name__}"] += 1
                continue
            with self.lock:
                self.restarts += 1

    # ---- a misbehaving client ----------------------------------------------------------------------------------
    def bad_frames(self) -> list[tuple[str, bytes]]:
        huge_int = ('{"kind":"open","start":' + "9" * 5000 + "}").encode()
        head = json.dumps({"kind": "step", "session": 1, "tensors": [{"name": "hidden", "dtype": "float32", "shape": [1, 1, 576]}]})
        oversize = json.dumps({"kind": "forward", "start": 0, "end": 15,
                               "tensors": [{"name": "hidden", "dtype": "float32", "shape": [64, 8192, 4096]}]})
        return [
            ("garbage", os.urandom(64)),
            ("huge_integer", struct.pack("<4sI", b"LSW1", len(huge_int)) + huge_int),
            ("unknown_kind", wire.encode({"kind": "teleport"})),
            ("truncated_tensor", struct.pack("<4sI", b"LSW1", len(head)) + head.encode() + b"\0" * 100),
            ("declared_oversize", struct.pack("<4sI", b"LSW1", len(oversize)) + oversize.encode()),
            ("bad_span", wire.encode({"kind": "open", "start": 20, "end": 10, "max_length": 8})),
            ("huge_max_length", wire.encode({"kind": "open", "start": 0, "end": 15, "max_length": 2**31})),
        ]

    def misbehave(self, swarm: LocalSwarm) -> None:
        frames = self.bad_frames()
        while self.running():
            servers = [s for s in swarm.routes().servers if s.state == "online"]
            if not servers:
                time.sleep(0.5)
                continue
            server = self.rng.choice(servers)
            name, frame = self.rng.choice(frames)
            kind = self.send_session_frame(server.url, frame) if self.rng.random() < 0.5 else self.post_forward(server, name)
            with self.lock:
                self.refusals[kind] += 1
            time.sleep(self.args.bad_every)

    def send_session_frame(self, url: str, frame: bytes) -> str:
        try:
            with connect(url.replace("http", "ws", 1) + "/v1/session", open_timeout=10, max_size=2**22) as socket_:
                socket_.send(frame)
                reply = socket_.recv(timeout=30)
                code = wire.decode(reply).header.get("code", "?") if isinstance(reply, bytes) else "text_frame"
                socket_.send(wire.encode({"kind": "close", "session": 0}))  # the connection must still answer
                socket_.recv(timeout=30)
                return f"session:{code}"
        except TimeoutError:
            return "session:TIMEOUT"
        except ConnectionClosed:
            return self.dropped("session", url)
        except (OSError, wire.ProtocolError) as error:
            return f"session:{type(error).__name__}"

    def dropped(self, kind: str, url: str) -> str:
        """A connection that ended without an answer: a defect, unless the soak had killed that server."""
        time.sleep(0.5)  # a kill in progress is recorded just before the SIGKILL
        with self.lock:
            killed = url in self.killed_urls
        return f"{kind}:KILLED_MID_REQUEST" if killed else f"{kind}:DROPPED"

    def post_forward(self, server: object, name: str) -> str:
        url = server.url  # type: ignore[attr-defined]
        if name == "declared_oversize" or self.rng.random() < 0.5:
            tokens = 8192  # within what a request may carry, far past what a small compute budget holds
            body = wire.encode({"kind": "backward", "start": server.start, "end": server.end},  # type: ignore[attr-defined]
                               {"hidden": torch.zeros(1, tokens, 576), "grad_output": torch.zeros(1, tokens, 576)})
        else:
            body = self.rng.choice(self.bad_frames())[1]
        try:
            response = requests.post(f"{url}/v1/backward", data=body, timeout=120)
        except requests.Timeout:
            return "http:TIMEOUT"
        except requests.ConnectionError:
            return self.dropped("http", url)
        with contextlib.suppress(Exception):
            return f"http:{response.status_code}:{wire.decode(response.content).header.get('code', '?')}"
        return f"http:{response.status_code}"

    # ---- idle connections -------------------------------------------------------------------------------------
    def idle_connections(self, swarm: LocalSwarm) -> None:
        held: list[socket.socket] = []
        for server in swarm.routes().servers[: self.args.idle]:
            address = urlparse(server.url)
            for _ in range(5):
                sock = socket.create_connection((address.hostname, address.port), timeout=10)
                sock.sendall(b"GET /v1/session HTTP/1.1\r\nHost: x\r\n")  # half a header, never finished
                held.append(sock)
        self.idle_opened = len(held)
        while self.running():
            time.sleep(1)
        closed = 0
        for sock in held:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass  # still open: the server never closed it
            except OSError:
                closed += 1
            sock.close()
        self.idle_closed = closed

    # ---- memory ------------------------------------------------------------------------------------------------
    def sample_memory(self, swarm: LocalSwarm) -> None:
        while self.running():
            for server_id, process in zip(swarm.server_ids, swarm.processes, strict=False):
                with contextlib.suppress(psutil.Error):
                    rss = psutil.Process(process.pid).memory_info().rss
                    self.peak_rss[server_id] = max(self.peak_rss.get(server_id, 0), rss)
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--kill-every", type=float, default=20)
    parser.add_argument("--bad-every", type=float, default=0.25, help="seconds between malformed requests")
    parser.add_argument("--idle", type=int, default=4, help="servers that get 5 idle connections each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = LocalSwarmOptions(servers=4, blocks_per_server=15, redundancy=2, port=0, progress=False)
    with LocalSwarm(options) as swarm:
        model = DistributedModelForCausalLM.from_pretrained("smollm2", swarm=swarm.url, progress=False)
        from llmswarm_core.source import resolve

        expected = expected_outputs(resolve("smollm2", progress=False).path, model.tokenizer, args.new_tokens)
        soak = Soak(args)
        soak.deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=soak.generate_forever, args=(model, expected, i)) for i in range(args.sessions)]
        threads += [threading.Thread(target=job, args=(swarm,)) for job in
                    (soak.kill_and_restart, soak.misbehave, soak.idle_connections, soak.sample_memory)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "seconds": args.seconds, "sessions": args.sessions, "new_tokens": args.new_tokens,
        "generations_completed": soak.completed, "generations_different": soak.different,
        "generations_failed": dict(soak.failed), "server_restarts": soak.restarts,
        "refusals": dict(sorted(soak.refusals.items())),
        "idle_connections_opened": soak.idle_opened, "idle_closed_by_server": soak.idle_closed,
        "peak_rss_mib": {k: round(v / 2**20) for k, v in sorted(soak.peak_rss.items())},
    }, indent=1))
    sys.exit(0 if soak.different == 0 else 1)


if __name__ == "__main__":
    main()
