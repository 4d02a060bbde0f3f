"""The pod network of the emulated node: network namespaces, a bridge, pod addresses, names.

Everything lives in network namespaces created here; nothing is added to the machine's own
network, and the only addresses used are in ``10.244.0.0/16`` inside those namespaces:

- the *node* namespace ``<prefix>-node`` holds the bridge ``br0`` with :data:`NODE_IP` (the
  kubelet's probes and the API server's forwarder live there) and :data:`NO_ENDPOINTS_IP`
  (nothing listens on it: a Service without ready pods resolves there, and every connection is
  refused, as kube-proxy rejects connections to a Service without endpoints);
- each pod gets a namespace ``<prefix>-<n>`` with ``lo`` and ``eth0`` (a veth whose peer is
  on the bridge) holding its own address, like a pod IP;
- ``/etc/netns/<namespace>/hosts`` and ``resolv.conf`` are what ``ip netns exec`` bind-mounts
  over ``/etc/hosts`` and ``/etc/resolv.conf`` for the processes of that pod. They are
  rewritten in place (same inode), so a running pod sees changes.

The prefix carries this process's id: namespaces left by a process that died (killed before
its cleanup) are removed by the next :class:`PodNetwork` that starts.

:func:`socket_in` makes a socket inside a namespace (``setns`` on a short-lived thread: Python
3.11 has no ``os.setns``); :class:`Forwarder` listens inside a namespace and relays to an address
of the harness's own namespace (the API server on 127.0.0.1), terminating TLS if asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBNET = ipaddress.IPv4Network("10.244.0.0/16")
NODE_IP = "10.244.0.1"
NO_ENDPOINTS_IP = "10.244.0.2"
FIRST_POD_IP = "10.244.1.2"
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_instances = itertools.count()
_STALE = re.compile(r"^kt(\d+)[a-z]+-")


class NetworkError(RuntimeError):
    """An ``ip`` command failed."""


async def ip(*args: str, stdin: str | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        "ip", *args, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    if process.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {err.decode().strip()}")
    return out.decode()


def socket_in(namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of network namespace `namespace` (it stays there whatever thread uses it)."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_RUN / namespace, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind))
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            result.append(error)

    thread = threading.Thread(target=run, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


async def connect_in(namespace: str, host: str, port: int, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection made from inside `namespace`."""
    sock = socket_in(namespace)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


@dataclass(frozen=True)
class PodAddress:
    namespace: str  # the network namespace's name
    ip: str
    veth: str  # the bridge side of the pod's veth (in the node namespace)


class PodNetwork:
    """The node namespace with its bridge, and one namespace per pod."""

    def __init__(self) -> None:
        self.prefix = f"kt{os.getpid()}{_letters(next(_instances))}"
        self.node = f"{self.prefix}-node"
        self._next_ip = int(ipaddress.IPv4Address(FIRST_POD_IP))
        self._released: list[str] = []
        self._counter = itertools.count(1)
        self.pods: dict[str, PodAddress] = {}
        self._created_etc = False

    async def create(self) -> None:
        await remove_stale_namespaces()
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir(parents=True)
            self._created_etc = True
        await ip("netns", "add", self.node)
        await ip("-n", self.node, "-batch", "-", stdin="\n".join([
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {NODE_IP}/{SUBNET.prefixlen} dev br0",
            f"addr add {NO_ENDPOINTS_IP}/{SUBNET.prefixlen} dev br0",
            "link set br0 up",
        ]) + "\n")

    async def add_pod(self) -> PodAddress:
        """A new namespace with its address on the bridge, and its (empty) /etc/netns folder."""
        n = next(self._counter)
        address = PodAddress(f"{self.prefix}-{n}", self._allocate(), f"veth{n}")
        self.pods[address.namespace] = address
        await ip("netns", "add", address.namespace)
        (NETNS_ETC / address.namespace).mkdir(exist_ok=True)
        await ip("-n", self.node, "-batch", "-", stdin="\n".join([
            f"link add {address.veth} type veth peer name eth0 netns {address.namespace}",
            f"link set {address.veth} master br0",
            f"link set {address.veth} up",
        ]) + "\n")
        await ip("-n", address.namespace, "-batch", "-", stdin="\n".join([
            "link set lo up",
            f"addr add {address.ip}/{SUBNET.prefixlen} dev eth0",
            "link set eth0 up",
        ]) + "\n")
        return address

    async def remove_pod(self, address: PodAddress) -> None:
        """Kill what still runs in the namespace, delete it (its veth pair goes with it) and its /etc/netns folder."""
        self.pods.pop(address.namespace, None)
        with contextlib.suppress(NetworkError):
            for pid in (await ip("netns", "pids", address.namespace)).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(NetworkError):
            await ip("netns", "del", address.namespace)
        shutil.rmtree(NETNS_ETC / address.namespace, ignore_errors=True)
        self._released.append(address.ip)

    def _allocate(self) -> str:
        if self._released:
            return self._released.pop(0)
        address = ipaddress.IPv4Address(self._next_ip)
        if address not in SUBNET or address == SUBNET.broadcast_address:
            raise NetworkError(f"no pod address left in {SUBNET}")
        self._next_ip += 1
        return str(address)

    def write(self, address: PodAddress, name: str, text: str) -> None:
        """Write /etc/netns/<ns>/<name> in place (a running pod's bind mount keeps the same inode)."""
        path = NETNS_ETC / address.namespace / name
        with open(path, "a+") as file:
            file.seek(0)
            if file.read() == text:
                return
            file.seek(0)
            file.truncate()
            file.write(text)

    async def close(self) -> None:
        for address in list(self.pods.values()):
            await self.remove_pod(address)
        with contextlib.suppress(NetworkError):
            await ip("netns", "del", self.node)
        if self._created_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only if empty: another run may be using it


def _letters(n: int) -> str:
    out = ""
    while True:
        out = chr(ord("a") + n % 26) + out
        n = n // 26 - 1
        if n < 0:
            return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def remove_stale_namespaces() -> list[str]:
    """Namespaces (and /etc/netns folders) of harnesses whose process is gone."""
    removed = []
    names = {p.name for p in NETNS_RUN.iterdir()} if NETNS_RUN.is_dir() else set()
    names |= {p.name for p in NETNS_ETC.iterdir()} if NETNS_ETC.is_dir() else set()
    for name in sorted(names):
        match = _STALE.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        if (NETNS_RUN / name).exists():
            with contextlib.suppress(NetworkError):
                await ip("netns", "del", name)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        removed.append(name)
    return removed


def namespaces_with_prefix(prefix: str) -> list[str]:
    """What is left of a harness: network namespaces and /etc/netns folders whose name starts with `prefix`."""
    names = [p.name for p in NETNS_RUN.iterdir()] if NETNS_RUN.is_dir() else []
    names += [f"/etc/netns/{p.name}" for p in NETNS_ETC.iterdir()] if NETNS_ETC.is_dir() else []
    return sorted(n for n in names if n.removeprefix("/etc/netns/").startswith(prefix))


class Forwarder:
    """Listens on ``host:port`` inside namespace `namespace`; relays each connection to ``target`` (here)."""

    def __init__(self, namespace: str, host: str, port: int, target: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        """With `tls`, connections are TLS (terminated here) and relayed in the clear."""
        self.namespace, self.host, self.port, self.target, self.tls = namespace, host, port, target, tls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        sock = socket_in(self.namespace)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._handle, sock=sock, ssl=self.tls)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
