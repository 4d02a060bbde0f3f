"""What a container runtime does inside a pod before the container's command runs.

The harness starts every container as ``ip netns exec <pod namespace> python -I -S podinit.py SPEC``.
``ip netns exec`` has already put the process in the pod's network namespace and in a new mount
namespace, with ``/etc/netns/<namespace>/hosts`` and ``resolv.conf`` bind-mounted over ``/etc``.
This script then, with the standard library only:

- takes a UTS namespace and sets the hostname to the pod's name;
- for a container that runs as another user than root, makes the ``expose`` paths (the Python
  runtime, which lives under ``/root`` on this machine) reachable: a tmpfs (mode 755) replaces the
  first ancestor others cannot enter, and the path is bind-mounted back into it;
- bind-mounts each volume at its ``mountPath`` (read-only where the mount says so);
- remounts ``/`` read-only for a ``readOnlyRootFilesystem`` container (volumes stay writable);
- changes to the working directory and to the container's user, group and supplementary groups;
- execs the container's command with the container's environment, looked up on that
  environment's ``PATH``, so the command is the process the harness started (it is the one
  that gets SIGTERM, then SIGKILL).

SPEC is a JSON file: ``{"hostname", "mounts": [{"source", "target", "readOnly"}], "readOnlyRoot",
"user": {"uid", "gid", "groups"}, "expose": [path], "workdir", "argv", "env"}``.
If the command cannot be started, it exits with 127 and says why on stderr, as a runtime
reports "executable file not found in $PATH".
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def bind(source: str, target: str, read_only: bool, name: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {name or source} on {target}")
    if read_only:
        _check(_libc.mount(None, target.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), f"read-only {target}")


def expose(path: str) -> None:
    """Make `path` reachable for any user: tmpfs over its first closed ancestor, `path` bound back into it."""
    closed = next((p for p in _ancestors(path) if not os.stat(p).st_mode & 0o001), None)
    if closed is None:
        return
    fd = os.open(path, os.O_PATH)
    try:
        _check(_libc.mount(b"tmpfs", closed.encode(), b"tmpfs", 0, b"mode=755"), f"tmpfs on {closed}")
        os.makedirs(path, mode=0o755)
        bind(f"/proc/self/fd/{fd}", path, read_only=False)
    finally:
        os.close(fd)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def main(argv: list[str]) -> int:
    with open(argv[1]) as file:
        spec = json.load(file)
    user = spec.get("user") or {"uid": 0, "gid": 0, "groups": []}
    command = spec["argv"]
    try:
        hostname = spec["hostname"].encode()
        _check(_libc.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
        _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
        # Every source is opened first: a mount (a volume on /tmp, a tmpfs on /root) may hide where the next one is.
        sources = [os.open(mount["source"], os.O_PATH) for mount in spec["mounts"]]
        if user["uid"] != 0:
            for path in spec.get("expose") or []:
                expose(path)
        for mount, fd in zip(spec["mounts"], sources, strict=True):
            bind(f"/proc/self/fd/{fd}", mount["target"], bool(mount["readOnly"]), mount["source"])
            os.close(fd)
        if spec.get("readOnlyRoot"):
            _check(_libc.mount(None, b"/", None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), "read-only /")
        os.setgroups(user["groups"])
        os.setgid(user["gid"])
        os.setuid(user["uid"])
        os.chdir(spec["workdir"])
    except OSError as error:
        print(f"podinit: cannot create the container: {error}", file=sys.stderr, flush=True)
        return 128
    try:
        os.execvpe(command[0], command, spec["env"])
    except OSError as error:
        print(f"podinit: cannot start {command[0]!r}: {error}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
