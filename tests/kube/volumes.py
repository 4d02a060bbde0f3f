"""Volumes as the kubelet lays them out on a node, and the paths the "image" must have.

- ConfigMap and Secret volumes are written like the kubelet's atomic writer: the files go to a
  new timestamped folder ``..2026_12_03_09_30_00.N``, ``..data`` is switched to it with one
  rename, and each top-level key is a symlink ``KEY -> ..data/KEY``. A reader sees the old
  files or the new ones, never a mix. (A ``subPath`` mount binds the file itself, so it never
  sees an update, as on a real node.)
- :func:`object_files` turns a ConfigMap's or Secret's data into those files, with
  ``items``, ``defaultMode`` and ``optional`` as written.
- :class:`HostPaths` creates the directories a container needs but this machine lacks (mount
  points such as ``/etc/llmswarm`` and working directories that the image would have), and
  removes them at the end if they are still empty.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import itertools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Body = dict[str, Any]
Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)

DEFAULT_MODE = 0o644
_counter = itertools.count(1)


class VolumeError(RuntimeError):
    """A volume cannot be set up yet (its object is missing): the pod waits, as in ContainerCreating."""


def object_data(kind: str, obj: Body) -> dict[str, bytes]:
    """The bytes of each key of a ConfigMap (``data``, ``binaryData``) or Secret (``data`` base64, ``stringData``)."""
    out: dict[str, bytes] = {}
    if kind == "ConfigMap":
        out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    else:
        out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def object_files(kind: str, source: Mapping[str, Any], obj: Body | None) -> Files:
    """The files of a configMap/secret volume source; a missing object or key is a VolumeError unless optional."""
    name = source.get("name") if kind == "ConfigMap" else source.get("secretName")
    optional = bool(source.get("optional", False))
    if obj is None:
        if optional:
            return {}
        raise VolumeError(f'{kind.lower()} "{name}" not found')
    data = object_data(kind, obj)
    mode = int(source.get("defaultMode", DEFAULT_MODE))
    items = source.get("items")
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeError(f'{kind.lower()} "{name}" has no key "{item["key"]}"')
        files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
    return files


def write_atomic(directory: Path, files: Files) -> None:
    """Lay `files` out in `directory` the way the kubelet's atomic writer does (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(tz=datetime.UTC).strftime("%Y_%m_%d_%H_%M_%S")
    new = directory / f"..{stamp}.{next(_counter)}"
    new.mkdir()
    for relative, (content, mode) in files.items():
        target = new / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    new.chmod(0o755)
    link = directory / "..data"
    old = os.readlink(link) if link.is_symlink() else None
    temporary = directory / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(new.name)
    os.replace(temporary, link)
    top = {relative.split("/", 1)[0] for relative in files}
    for name in top:
        entry = directory / name
        if not entry.is_symlink():
            entry.symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in top:
            entry.unlink()
    if old is not None and old != new.name:
        shutil.rmtree(directory / old, ignore_errors=True)


class HostPaths:
    """Directories created on this machine for containers (mount points, working directories); removed at the end."""

    def __init__(self) -> None:
        self.created: list[Path] = []

    def ensure(self, path: str | Path, directory: bool = True) -> None:
        target = Path(path)
        if target.exists() or target.is_symlink():
            return
        missing = []
        parent = target
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for item in reversed(missing):
            if item == target and not directory:
                item.touch()
            else:
                item.mkdir()
            self.created.append(item)

    def cleanup(self) -> list[str]:
        """Remove what was created, deepest first, if still empty; returns what could not be removed."""
        left = []
        for item in reversed(self.created):
            try:
                if item.is_dir() and not item.is_symlink():
                    item.rmdir()
                else:
                    item.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(str(item))
        self.created.clear()
        return left
