"""A model store: a model written once per revision as per-block files, that servers read their spans from.

On Kubernetes a Swarm's store is a shared volume; a Job runs ``python -m llmswarm_core.model_store`` once per
model revision to fill it (download or convert), and server pods mount it read-only and are started with
``--model STORE/KEY``, a plain model directory: they convert nothing and download nothing, and a server reads
only its own span's ``block-NNNNN.safetensors`` files (plus config and tokenizer).

Layout of the store (``root``)::

    root/KEY/                    the model as a block cache (source.py): config, tokenizer,
                                 model.safetensors.index.json, client.safetensors, block-00000.safetensors, ...
    root/KEY/llmswarm-store.json the ready marker, written last: what was filled from where
    root/.KEY.lock               held while a fill runs (a second fill waits, then finds the marker)
    root/.staging/KEY/           a hub download in progress (removed once split)

``KEY`` (:func:`store_key`) is the model's name plus a digest of the source, the revision and this format,
so a new revision is a new directory next to the old one: servers of the old revision keep reading theirs
until they are replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

STORE_FORMAT = 1
READY_FILE = "llmswarm-store.json"
STAGING = ".staging"
#: Files besides the weights that a model directory needs (config, tokenizer, generation settings).
METADATA_PATTERNS = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")
HUB_PATTERNS = [*METADATA_PATTERNS, "*.safetensors"]


class StoreError(RuntimeError):
    """The store cannot be filled (a bad source, a full volume, a refused download)."""


def store_key(source: str, revision: str = "") -> str:
    """The directory of (`source`, `revision`) in a store: ``<name>-<digest>``, at most 80 characters of
    ``[a-z0-9._-]`` (a valid file name, and readable in ``kubectl get``)."""
    from llmswarm_core.source import model_name

    digest = hashlib.sha256(f"{STORE_FORMAT}\0{source}\0{revision}".encode()).hexdigest()[:12]
    name = re.sub(r"[^a-z0-9._-]+", "-", model_name(source).lower()).strip("-.") or "model"
    return f"{name[:66]}-{digest}"


def is_ready(root: Path, key: str) -> bool:
    return (root / key / READY_FILE).is_file()


def fill(source: str, root: Path, revision: str = "", key: str | None = None, progress: bool = True) -> bool:
    """Make ``root/KEY`` hold `source` at `revision` as per-block files. Returns True if it converted or
    downloaded anything, False if the store already held it (a second fill does nothing)."""
    key = key or store_key(source, revision)
    target = root / key
    if is_ready(root, key):
        print(f"model store: {target} is ready, nothing to do", flush=True)
        return False
    from llmswarm_core.source import file_lock

    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key}.lock"):
        if is_ready(root, key):  # another fill finished meanwhile
            print(f"model store: {target} is ready, nothing to do", flush=True)
            return False
        if target.exists():  # a fill that died between the rename and the marker
            shutil.rmtree(target)
        started = time.monotonic()
        _convert(source, revision, root, target, progress)
        files = sorted(p.name for p in target.iterdir())
        marker = {"format": STORE_FORMAT, "source": source, "revision": revision, "key": key, "files": files,
                  "seconds": round(time.monotonic() - started, 1)}
        _write_atomically(target / READY_FILE, json.dumps(marker, indent=1))
    print(f"model store: filled {target} from {source}{'@' + revision if revision else ''} "
          f"({len(files)} files, {marker['seconds']} s)", flush=True)
    return True


def _convert(source: str, revision: str, root: Path, target: Path, progress: bool) -> None:
    from llmswarm_core.defaults import DEFAULT_MODEL
    from llmswarm_core.source import ModelDir, convert_gguf, smollm2_gguf_path

    path = Path(source).expanduser()
    if source == DEFAULT_MODEL or (path.suffix == ".gguf" and path.is_file()):
        convert_gguf(smollm2_gguf_path() if source == DEFAULT_MODEL else path, target, progress=progress)
    elif path.is_dir():
        split_into_blocks(ModelDir(path), target, progress)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        staging = root / STAGING / target.name
        _download(source, revision, staging)
        split_into_blocks(ModelDir(staging, name=source), target, progress)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        raise StoreError(f"{source!r} is not a model directory, a .gguf file, a hub id (org/name) or {DEFAULT_MODEL!r}")


def _download(repo_id: str, revision: str, staging: Path) -> None:
    """The hub's safetensors and metadata into `staging` (on the store's volume, not the pod's disk); the token is
    ``HF_TOKEN`` (the Job gets it from the Swarm's Secret). An interrupted download resumes."""
    from huggingface_hub import snapshot_download

    print(f"model store: downloading {repo_id}{'@' + revision if revision else ''} into {staging}", flush=True)
    try:
        snapshot_download(repo_id, revision=revision or None, local_dir=staging, allow_patterns=HUB_PATTERNS)
    except Exception as error:
        raise StoreError(f"cannot download {repo_id} from the hub: {error}") from error


def split_into_blocks(model: Any, target: Path, progress: bool = True) -> None:
    """Rewrite a safetensors model directory (`model`: a :class:`~llmswarm_core.source.ModelDir`) as a block
    cache at `target`, one block at a time: memory holds one block, never the whole model. Written into a
    temporary directory next to `target`, then renamed."""
    from llmswarm_core.source import INDEX_FILE, block_file, staged, write_weight_files

    groups: dict[str, list[str]] = {}
    for key in model.weight_map:
        groups.setdefault(block_file(model.arch, key), []).append(key)
    with staged(target) as tmp:
        write_weight_files(tmp, {file: (lambda k=keys: model.tensors(k)) for file, keys in groups.items()}, progress,
                           "splitting into blocks")
        for pattern in METADATA_PATTERNS:
            for item in model.path.glob(pattern):
                if item.is_file() and item.name not in (INDEX_FILE, READY_FILE):
                    shutil.copyfile(item, tmp / item.name)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmswarm_core.model_store",
                                     description="Fill a model store once: the model as per-block files.")
    parser.add_argument("--source", required=True, help="model SPEC (directory, .gguf, org/name or smollm2)")
    parser.add_argument("--store", required=True, type=Path, help="the store's root directory (the mounted volume)")
    parser.add_argument("--revision", default="", help="hub revision (branch, tag or commit); part of the key")
    parser.add_argument("--key", help="directory inside the store (default: derived from source and revision)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    expected = store_key(args.source, args.revision)
    if args.key and args.key != expected:
        print(f"error: --key {args.key} is not {expected}, the key of {args.source}@{args.revision}", file=sys.stderr)
        return 2
    try:
        fill(args.source, args.store, args.revision, expected, progress=not args.quiet)
    except (StoreError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
