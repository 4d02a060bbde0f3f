"""Published LoRA adapters: checked once when published, kept by the route-map service, served per span.

A client publishes an adapter (``POST /v1/adapters/{name}``) as one safetensors file: PEFT's
key names (``base_model.model.<blocks>.<i>.<module>.lora_A.weight`` ...) and, in the file's
metadata under ``llmswarm.lora``, the JSON ``{r, alpha, target_modules, base_model}``. The
store checks it (:func:`parse_upload`, pure) before it keeps anything:

- the name (letters, digits, ``_.-``, no leading dot), the size (``max_adapter_bytes``), a
  safetensors file at all (its header read by hand first, so nothing is made of a bad one);
- the spec as the wire's (rank, alpha, targets), the base model against the swarm's;
- only LoRA weights of blocks, every block of the model, the same modules in each, each
  matching a target and each target matching one, A [r, in] and B [out, r] of one shape
  across blocks;
- where the service knows the model's blocks (``shapes``, the local substrate passes them),
  that the targets match exactly those modules with exactly those sizes.

It keeps the weights once, packed as a client's LoRA is on the wire ([blocks, per_block], the
layout of ``llmswarm_core.lora``), so ``GET /v1/adapters/{name}/blocks/{start}-{end}`` hands
a server its span's rows as a wire frame, and the server checks them against its real
modules as it checks a client's own weights. A name is replaced only with ``replace`` and by
whoever published it (the SHA-256 of their publisher key must match).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from llmswarm_core import wire
from llmswarm_core.lora import (
    ADAPTER_NAME,
    LORA_TENSOR,
    UPLOAD_METADATA,
    BlockLayout,
    LoraLayoutError,
    LoraSpec,
    PublishedBlocks,
    Slot,
    block_layout,
    matches,
    split_peft_key,
)

log = logging.getLogger("llmswarm_control.adapters")

MAX_HEADER_BYTES = 1024 * 1024  # a safetensors header (JSON) of a published adapter
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

Modules = Sequence[tuple[str, int | None, int | None]]  # one block's (path, in, out), as llmswarm_core.lora reads them


class AdapterRefused(Exception):
    """A publication (or a request for an adapter) refused: its HTTP status and what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class AdapterLimits:
    max_adapter_bytes: int = 256 * 1024 * 1024  # one published file
    max_store_bytes: int = 2 * 1024**3  # every adapter the service keeps


@dataclass(frozen=True)
class Publication:
    """A checked upload: its spec, base model and the packed weights of every block."""

    spec: LoraSpec
    base_model: str
    weights: torch.Tensor  # [blocks, per_block], float32
    size: int  # bytes of the published file
    digest: str  # SHA-256 of the published file


@dataclass
class StoredAdapter:
    name: str
    publisher: str
    key_hash: str
    publication: Publication
    published_at: float = field(default_factory=time.time)

    def summary(self) -> dict[str, object]:
        spec = self.publication.spec
        return {"name": self.name, "publisher": self.publisher, "size": self.publication.size,
                "base_model": self.publication.base_model, "target_modules": spec.target_modules, "r": spec.r,
                "alpha": spec.alpha, "blocks": int(self.publication.weights.shape[0]),
                "digest": self.publication.digest, "published_at": self.published_at}


def check_name(name: str) -> None:
    if not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterRefused(400, f"bad adapter name {name!r}: 1-128 letters, digits, '_', '.', '-', not starting "
                                  "with '.' or '-'")


def read_header(data: bytes) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """(metadata, tensor entries) of a safetensors file, checked before any tensor is made."""
    if len(data) < 8:
        raise AdapterRefused(400, "not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack_from("<Q", data)
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise AdapterRefused(400, f"not a safetensors file: a header of {length} bytes in a file of {len(data)}")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AdapterRefused(400, f"not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise AdapterRefused(400, "not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterRefused(400, "not a safetensors file: __metadata__ is not an object")
    entries: dict[str, dict[str, object]] = {}
    body = len(data) - 8 - length
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _FLOATS:
            raise AdapterRefused(400, f"tensor {key!r} must be F32, F16 or BF16")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) and 0 < n <= 2**20 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)):
            raise AdapterRefused(400, f"tensor {key!r} must be a matrix with its data_offsets")
        nbytes = shape[0] * shape[1] * _FLOATS[str(entry["dtype"])].itemsize
        if not 0 <= offsets[0] <= offsets[1] <= body or offsets[1] - offsets[0] != nbytes:
            raise AdapterRefused(400, f"not a safetensors file: tensor {key!r} lies outside the data or has a wrong size")
        entries[key] = entry
    return metadata, entries


def _tensor(data: bytes, length: int, entry: dict[str, object]) -> torch.Tensor:
    start, end = entry["data_offsets"]  # type: ignore[misc]
    shape: list[int] = entry["shape"]  # type: ignore[assignment]
    raw = bytearray(data[8 + length + start:8 + length + end])
    return torch.frombuffer(raw, dtype=_FLOATS[str(entry["dtype"])]).view(shape).to(torch.float32)


def _spec(metadata: dict[str, object]) -> tuple[LoraSpec, str]:
    raw = metadata.get(UPLOAD_METADATA)
    if not isinstance(raw, str):
        raise AdapterRefused(400, f"the file's metadata lacks {UPLOAD_METADATA!r} (publish with publish_adapter() or "
                                  "`llmswarm adapters push`)")
    try:
        fields = json.loads(raw)
        base_model = fields.pop("base_model")
        spec = LoraSpec.model_validate(fields)
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise AdapterRefused(400, f"bad {UPLOAD_METADATA} metadata: {detail}") from None
    if not isinstance(base_model, str) or not base_model:
        raise AdapterRefused(400, f"bad {UPLOAD_METADATA} metadata: base_model must be a model name")
    return spec, base_model


def parse_upload(data: bytes, limits: AdapterLimits, model_name: str | None, num_blocks: int | None,
                 shapes: Modules | None = None) -> Publication:
    """Check a published file against the swarm's model (see the module's docstring); AdapterRefused if it does not fit."""
    if len(data) > limits.max_adapter_bytes:
        raise AdapterRefused(413, f"the adapter has {len(data)} bytes, the limit is {limits.max_adapter_bytes}")
    metadata, entries = read_header(data)
    spec, base_model = _spec(metadata)
    if model_name is not None and base_model != model_name:
        raise AdapterRefused(409, f"the adapter is for {base_model!r}, the swarm serves {model_name!r}")
    found: dict[int, dict[str, dict[str, list[int]]]] = {}
    block_paths = set()
    for key, entry in entries.items():
        split = split_peft_key(key)
        if split is None:
            raise AdapterRefused(400, f"{key!r} is not a LoRA weight of a block (base_model.model.<blocks>.<i>.<module>"
                                      ".lora_A.weight or .lora_B.weight)")
        block_paths.add(split[0])
        found.setdefault(split[1], {}).setdefault(split[2], {})[split[3]] = entry["shape"]  # type: ignore[assignment]
    if len(block_paths) != 1:
        raise AdapterRefused(400, f"the weights name {len(block_paths)} block lists {sorted(block_paths)[:3]}, not one")
    blocks = num_blocks if num_blocks is not None else max(found) + 1
    if sorted(found) != list(range(blocks)):
        missing = sorted(set(range(blocks)) - set(found))[:4]
        raise AdapterRefused(400, f"the adapter must hold every block 0..{blocks - 1} of the model: missing {missing}, "
                                  f"extra {sorted(set(found) - set(range(blocks)))[:4]}")
    layout = _layout(found, spec)
    if shapes is not None:
        try:
            real = block_layout(shapes, spec)
        except LoraLayoutError as error:
            raise AdapterRefused(400, f"the adapter does not fit the model: {error}") from None
        if real != layout:
            raise AdapterRefused(400, f"the adapter does not fit the model: its modules {_sizes(layout)} against the "
                                      f"model's {_sizes(real)}")
    length = struct.unpack_from("<Q", data)[0]
    block_path = block_paths.pop()
    rows = []
    for block in range(blocks):
        pairs = {slot.path: tuple(_tensor(data, length, entries[f"base_model.model.{block_path}.{block}.{slot.path}"
                                                                 f".lora_{which}.weight"]) for which in "AB")
                 for slot in layout.slots}
        rows.append(layout.pack(pairs))  # type: ignore[arg-type]
    weights = torch.stack(rows)
    if not bool(torch.isfinite(weights).all()):
        raise AdapterRefused(400, "the adapter holds a value that is not finite")
    return Publication(spec, base_model, weights, len(data), hashlib.sha256(data).hexdigest())


def _layout(found: dict[int, dict[str, dict[str, list[int]]]], spec: LoraSpec) -> BlockLayout:
    """The packed layout the weights' own shapes give, the same in every block and matching the targets."""
    first = found[0]
    for block, modules in found.items():
        if modules != first:
            raise AdapterRefused(400, f"block {block} holds other modules or shapes than block 0")
    slots, offset = [], 0
    for path in sorted(first):
        pair = first[path]
        if set(pair) != {"A", "B"}:
            raise AdapterRefused(400, f"module {path!r} needs both lora_A and lora_B")
        (rank_a, fan_in), (fan_out, rank_b) = pair["A"], pair["B"]
        if rank_a != spec.r or rank_b != spec.r:
            raise AdapterRefused(400, f"module {path!r}: A {pair['A']} and B {pair['B']} do not have rank r={spec.r}")
        if not any(matches(path, target) for target in spec.target_modules):
            raise AdapterRefused(400, f"module {path!r} matches none of the target modules {spec.target_modules}")
        slot = Slot(path, fan_in, fan_out, offset)
        slots.append(slot)
        offset += slot.a_size(spec.r) + slot.b_size(spec.r)
    unmatched = [t for t in spec.target_modules if not any(matches(s.path, t) for s in slots)]
    if unmatched:
        raise AdapterRefused(400, f"target modules {unmatched} match no weights of the adapter")
    return BlockLayout(spec.r, tuple(slots))


def _sizes(layout: BlockLayout) -> list[str]:
    return [f"{s.path} {s.in_features}->{s.out_features}" for s in layout.slots]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AdapterStore:
    """The published adapters of one swarm, in memory; safe to use from several threads."""

    def __init__(self, limits: AdapterLimits | None = None, shapes: Modules | None = None,
                 directory: Path | None = None) -> None:
        self.limits = limits or AdapterLimits()
        self.shapes = shapes  # one block's modules, where the service knows the model (None: servers check on load)
        self._adapters: dict[str, StoredAdapter] = {}
        self._lock = threading.Lock()
        # Where publications are kept across restarts (a PVC on Kubernetes): NAME.safetensors, the file as
        # published, and NAME.json, who published it; None keeps them in memory only.
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._load(directory)

    def _load(self, directory: Path) -> None:
        """Every publication kept in `directory`, checked again as an upload; one that no longer checks is skipped."""
        for meta_file in sorted(directory.glob("*.json")):
            name = meta_file.stem
            try:
                check_name(name)
                meta = json.loads(meta_file.read_text())
                data = (directory / f"{name}.safetensors").read_bytes()
                publication = parse_upload(data, self.limits, None, None, self.shapes)
                self._adapters[name] = StoredAdapter(name, str(meta["publisher"]), str(meta["key_hash"]), publication,
                                                     float(meta.get("published_at", time.time())))
            except (AdapterRefused, OSError, ValueError, KeyError, TypeError) as error:
                log.warning("skipping the kept adapter %s: %s", meta_file, error)

    def _keep(self, stored: StoredAdapter, data: bytes) -> None:
        if self.directory is None:
            return
        meta = {"publisher": stored.publisher, "key_hash": stored.key_hash, "published_at": stored.published_at}
        for path, content in ((self.directory / f"{stored.name}.safetensors", data),
                              (self.directory / f"{stored.name}.json", json.dumps(meta).encode())):
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(content)
            os.replace(partial, path)  # a reader (or a restart) sees the old file or the new one, never half

    def _forget(self, name: str) -> None:
        if self.directory is not None:
            for suffix in (".json", ".safetensors"):
                (self.directory / f"{name}{suffix}").unlink(missing_ok=True)

    def publish(self, name: str, data: bytes, publisher: str, key: str, replace: bool, model_name: str | None,
                num_blocks: int | None, admin: bool = False) -> StoredAdapter:
        check_name(name)
        if not key:
            raise AdapterRefused(400, "publishing needs a publisher key (header X-Llmswarm-Publisher-Key)")
        with self._lock:
            self._may_publish(name, key, replace, admin)
        publication = parse_upload(data, self.limits, model_name, num_blocks, self.shapes)
        with self._lock:
            self._may_publish(name, key, replace, admin)  # again: another publication may have come meanwhile
            old = self._adapters.get(name)
            held = sum(a.publication.weights.numel() * 4 for a in self._adapters.values() if a is not old)
            if held + publication.weights.numel() * 4 > self.limits.max_store_bytes:
                raise AdapterRefused(413, f"the route map's adapter store is full ({held} of "
                                          f"{self.limits.max_store_bytes} bytes held)")
            stored = StoredAdapter(name, publisher, key_hash(key), publication)
            self._keep(stored, data)
            self._adapters[name] = stored
        return stored

    def _may_publish(self, name: str, key: str, replace: bool, admin: bool = False) -> None:
        old = self._adapters.get(name)
        if old is None:
            return
        if not replace:
            raise AdapterRefused(409, f"adapter {name!r} exists (published by {old.publisher}); publish with replace "
                                      "to replace it")
        if not admin and not hmac.compare_digest(old.key_hash, key_hash(key)):
            raise AdapterRefused(403, f"adapter {name!r} was published by {old.publisher}; only that publisher "
                                      "(its publisher key or credential) or an admin may replace it")

    def delete(self, name: str, key: str, admin: bool = False) -> StoredAdapter:
        """Remove adapter `name`: only its publisher (the same key) or an admin may."""
        stored = self.get(name)
        with self._lock:
            if not admin and not hmac.compare_digest(stored.key_hash, key_hash(key)):
                raise AdapterRefused(403, f"adapter {name!r} was published by {stored.publisher}; only that publisher "
                                          "or an admin may delete it")
            self._adapters.pop(name, None)
            self._forget(name)
        return stored

    def get(self, name: str) -> StoredAdapter:
        check_name(name)
        with self._lock:
            found = self._adapters.get(name)
        if found is None:
            raise AdapterRefused(404, f"no adapter {name!r} is published")
        return found

    def listing(self) -> list[dict[str, object]]:
        with self._lock:
            return [a.summary() for _, a in sorted(self._adapters.items())]

    @staticmethod
    def blocks(stored: StoredAdapter, start: int, end: int) -> bytes:
        """The wire frame of blocks [start, end) of a stored adapter (PublishedBlocks + tensor ``lora``)."""
        weights = stored.publication.weights
        if not 0 <= start < end <= weights.shape[0]:
            raise AdapterRefused(400, f"blocks [{start}, {end}) are outside the adapter's {weights.shape[0]} blocks")
        header = PublishedBlocks(kind="adapter_blocks", name=stored.name, start=start, end=end, lora=stored.publication.spec,
                                 digest=stored.publication.digest)
        return wire.encode(header.model_dump(), {LORA_TENSOR: weights[start:end]})
