"""A client's own LoRA weights on the server: checked against the span, applied per row of a pass, trained.

A request (a stateless forward or backward, or a session's open) may carry the client's LoRA
weights for its blocks (llmswarm_core/lora.py: the header, the packed layout). They are checked
here against the span's real modules and this server's limits (:class:`LoraLimits`) and become
a :class:`ClientLora`: per-request weights, never written into the span, whose base weights stay
frozen. A session keeps its open's weights for all its steps.

One pass may hold rows of many clients, each with its own LoRA or none (multi-LoRA batching, as
S-LoRA and Punica do it): :class:`LoraRows` says which rows use which weights, and
:func:`applied` hooks each target module of the pass's blocks for the pass. The base output is
computed once for every row; each row with weights adds its own low-rank delta
``(x @ A.T @ B.T) * alpha / r``: in one pair of matrix products when every row uses the same
weights (exactly PEFT's computation), else with each row's A and B gathered from the pass's
stacked adapters into two batched products (``bmm``), added to those rows only (``index_add``).
Rows without weights get no delta at all.

Backward makes a request's weights a leaf of the autograd graph: after it, ``ClientLora.grad``
holds the gradient of the loss for them, in the layout they came in.

A request naming an adapter this server does not host gets the one published under that name
on the route map (:func:`published_adapter`): fetched for this span only on first use, checked
as a client's own weights are, kept within ``published_bytes`` and re-validated with the route
map (ETag) after ``published_ttl`` seconds; it then runs exactly as a client's own weights.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from llmswarm_core import wire
from llmswarm_core.lora import (
    LORA_TENSOR,
    BlockLayout,
    LoraLayoutError,
    LoraSpec,
    PublishedBlocks,
    linear_modules,
    span_layout,
)
from llmswarm_core.wire import ProtocolError

if TYPE_CHECKING:
    from llmswarm_node.span_loader import LoadedSpan

RETRY_AFTER = 1.0
log = logging.getLogger("llmswarm.node")


@dataclass(frozen=True)
class LoraLimits:
    """Bounds on clients' LoRA weights; exceeding one is refused before anything runs."""

    max_rank: int = 64
    max_request_bytes: int = 32 * 1024 * 1024  # one request's (or session's) weights for its blocks
    session_bytes: int = 1024**3  # what all open sessions hold together
    published_bytes: int = 1024**3  # published adapters kept for this span (least recently used go first)
    published_ttl: float = 30.0  # seconds a fetched adapter is used before the route map is asked whether it changed


@dataclass(eq=False)
class ClientLora:
    """One request's or session's LoRA weights for blocks [start, end): ``weights`` [blocks, layout.size]."""

    spec: LoraSpec
    layout: BlockLayout
    weights: torch.Tensor
    grad: torch.Tensor | None = field(default=None, repr=False)  # after a backward: d loss / d weights, same layout

    @property
    def nbytes(self) -> int:
        return self.weights.numel() * self.weights.element_size()

    def pairs(self, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A [r, in], B [out, r]) per module path of the request's block number `block` (from 0)."""
        return self.layout.unpack(self.weights[block])

    def blocks(self, first: int, last: int) -> ClientLora:
        """The weights of the request's blocks [first, last) (a view: gradients reach these weights)."""
        return replace(self, weights=self.weights[first:last], grad=None)

    def trainable(self) -> ClientLora:
        """The same weights as a leaf that collects gradients."""
        return replace(self, weights=self.weights.detach().requires_grad_(True), grad=None)


@dataclass
class _Published:
    lora: ClientLora | None  # this span's rows; None: not published (kept briefly, so unknown names cost little)
    etag: str | None
    checked: float


class LoraStore:
    """The layouts of this span's blocks per LoRA spec, the weights that open sessions hold (weakly), and the
    published adapters fetched for this span."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[int, int, tuple[int, tuple[str, ...]]], BlockLayout | str] = {}
        self._held: weakref.WeakSet[ClientLora] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.published: OrderedDict[str, _Published] = OrderedDict()
        self.fetching: dict[str, asyncio.Lock] = {}

    def layout(self, span: LoadedSpan, start: int, end: int, spec: LoraSpec) -> BlockLayout:
        """The packed layout of blocks [start, end) for `spec`; raises LoraLayoutError where the targets do not fit."""
        key = (start, end, spec.key)
        if key not in self._layouts:
            layers = span.layers()
            blocks = [linear_modules(layers[block - span.start]) for block in range(start, end)]
            try:
                self._layouts[key] = span_layout(blocks, spec)
            except LoraLayoutError as error:
                self._layouts[key] = str(error)
        found = self._layouts[key]
        if isinstance(found, str):
            raise LoraLayoutError(found)
        return found

    def held_bytes(self) -> int:
        with self._lock:
            return sum(lora.nbytes for lora in list(self._held))

    def hold(self, lora: ClientLora) -> None:
        """Count `lora` against the sessions' budget for as long as something (its session) keeps it."""
        with self._lock:
            self._held.add(lora)


def request_lora(span: LoadedSpan, limits: LoraLimits, store: LoraStore, spec: LoraSpec | None, adapter: str | None,
                 start: int, end: int, tensors: dict[str, torch.Tensor]) -> ClientLora | None:
    """A request's LoRA weights for blocks [start, end), checked; takes the tensor ``lora`` out of `tensors`."""
    tensor = tensors.pop(LORA_TENSOR, None)
    if spec is None:
        if tensor is not None:
            raise ProtocolError("bad_request", "a 'lora' tensor needs the header field 'lora' {r, alpha, target_modules}")
        return None
    if adapter is not None:
        raise ProtocolError("bad_request", f"a request uses a server's adapter ({adapter!r}) or its own LoRA weights, "
                                           "not both")
    _check_blocks(span, start, end)
    if spec.r > limits.max_rank:
        raise ProtocolError("too_large", f"LoRA rank {spec.r} exceeds this server's limit {limits.max_rank}")
    try:
        layout = store.layout(span, start, end, spec)
    except LoraLayoutError as error:
        raise ProtocolError("bad_request", f"the LoRA targets do not fit blocks [{start}, {end}): {error}") from None
    shape = [end - start, layout.size]
    nbytes = shape[0] * shape[1] * 4
    if nbytes > limits.max_request_bytes:
        raise ProtocolError("too_large", f"LoRA weights of {nbytes} bytes for blocks [{start}, {end}) exceed this "
                                         f"server's limit of {limits.max_request_bytes}")
    if tensor is None:
        raise ProtocolError("bad_request", "the header names LoRA weights but the tensor 'lora' is missing")
    if tensor.dtype != torch.float32 or list(tensor.shape) != shape:
        raise ProtocolError("bad_request", f"'lora' must be a float32 tensor {shape} (a row per block: A [r, in] then "
                                           f"B [out, r] for each of {list(layout.paths)}), got {tensor.dtype} "
                                           f"{list(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ProtocolError("bad_request", "'lora' holds a value that is not finite")
    return ClientLora(spec, layout, tensor.to(span.device))


def _check_blocks(span: LoadedSpan, start: int, end: int) -> None:
    if not span.start <= start < end <= span.end:
        raise ProtocolError("bad_request", f"blocks [{start}, {end}) are not inside this server's span "
                                           f"[{span.start}, {span.end})")


def session_lora(span: LoadedSpan, limits: LoraLimits, store: LoraStore, spec: LoraSpec | None, adapter: str | None,
                 start: int, end: int, tensors: dict[str, torch.Tensor]) -> ClientLora | None:
    """An open's LoRA weights (the only tensor an open may carry), within the budget of what sessions hold."""
    tensors = dict(tensors)
    lora = request_lora(span, limits, store, spec, adapter, start, end, tensors)
    if tensors:
        raise ProtocolError("bad_request", f"an open carries no tensors but 'lora', got {sorted(tensors)}")
    if lora is not None:
        held = store.held_bytes()
        if lora.nbytes > limits.session_bytes:
            raise ProtocolError("too_large", f"LoRA weights of {lora.nbytes} bytes exceed what this server's sessions "
                                             f"may hold ({limits.session_bytes})")
        if held + lora.nbytes > limits.session_bytes:
            raise ProtocolError("overloaded", f"sessions hold {held} bytes of LoRA weights; {lora.nbytes} more exceed "
                                              f"the limit {limits.session_bytes}", retry_after=RETRY_AFTER)
    return lora


# ---- published adapters ----------------------------------------------------------------------------------------------
MISSING_TTL = 2.0  # seconds a name the route map does not know is answered without asking it again


class RouteMapAccess(Protocol):
    """Where this server's route map is (ServerOptions)."""

    @property
    def swarm(self) -> str | None: ...

    @property
    def token(self) -> str | None: ...

    @property
    def tls_ca(self) -> str | None: ...


RequestT = TypeVar("RequestT", wire.OpenRequest, wire.ForwardRequest, wire.BackwardRequest)


async def published_adapter(store: LoraStore, span: LoadedSpan, hosted: Collection[str], limits: LoraLimits,
                            route_map: RouteMapAccess, request: RequestT) -> tuple[RequestT, ClientLora | None]:
    """A request naming an adapter this server does not host: the adapter published under that name (fetched for
    this span on first use), as the request's own LoRA weights; the request without its adapter name.
    Anything else comes back as it is, with None."""
    name = request.adapter
    if name is None or name in hosted or request.lora is not None:
        return request, None
    _check_blocks(span, request.start, request.end)
    lora = await _fetch_published(store, span, hosted, limits, route_map, name)
    weights = lora.blocks(request.start - span.start, request.end - span.start)
    return request.model_copy(update={"adapter": None}), weights


async def _fetch_published(store: LoraStore, span: LoadedSpan, hosted: Collection[str], limits: LoraLimits,
                           route_map: RouteMapAccess, name: str) -> ClientLora:
    lock = store.fetching.setdefault(name, asyncio.Lock())
    async with lock:  # one fetch per name at a time; the others then find it kept
        entry = store.published.get(name)
        now = time.monotonic()
        ttl = MISSING_TTL if entry is not None and entry.lora is None else limits.published_ttl
        if entry is None or now - entry.checked > ttl:
            entry = await _refresh(span, limits, store, route_map, name, entry)
            entry.checked = now
            store.published[name] = entry
        store.published.move_to_end(name)
        _evict(store, limits)
    if entry.lora is None:
        raise ProtocolError("bad_request", f"unknown adapter {name!r}: this server hosts {sorted(hosted)}, and the route "
                                           "map has no adapter published under that name")
    return entry.lora


async def _refresh(span: LoadedSpan, limits: LoraLimits, store: LoraStore, route_map: RouteMapAccess, name: str,
                   entry: _Published | None) -> _Published:
    """The route map's current version of adapter `name` for this span (the kept one where it did not change)."""
    from llmswarm_core.routemap_client import RouteMapClient, RouteMapError

    if route_map.swarm is None:
        return _Published(None, None, 0.0)
    etag = entry.etag if entry is not None and entry.lora is not None else None
    try:
        async with RouteMapClient(route_map.swarm, route_map.token, route_map.tls_ca, timeout=60.0) as client:
            body, etag = await client.adapter_blocks(name, span.start, span.end, limits.max_request_bytes + 64 * 1024, etag)
    except RouteMapError as error:
        if error.status == 404:
            return _Published(None, None, 0.0)
        if entry is not None and entry.lora is not None:
            log.warning("cannot refresh published adapter %r (%s); serving the kept one", name, error)
            return entry
        code = "too_large" if error.status == 413 else "overloaded"
        raise ProtocolError(code, f"cannot fetch published adapter {name!r}: {error}", retry_after=RETRY_AFTER) from None
    if body is None:  # unchanged
        assert entry is not None
        return entry
    return _Published(_published_weights(span, limits, store, name, body), etag, 0.0)


def _published_weights(span: LoadedSpan, limits: LoraLimits, store: LoraStore, name: str, body: bytes) -> ClientLora:
    """The route map's frame for this span, checked as a client's own weights are (llmswarm_core.lora.PublishedBlocks)."""
    try:
        frame = wire.decode(body, wire.WireLimits(max_tensors=1, max_tensor_bytes=limits.max_request_bytes))
        header = PublishedBlocks.model_validate(frame.header)
        if (header.name, header.start, header.end) != (name, span.start, span.end):
            raise ValueError(f"it sent {header.name!r} blocks [{header.start}, {header.end})")
        lora = request_lora(span, limits, store, header.lora, None, span.start, span.end, dict(frame.tensors))
    except (ProtocolError, ValueError) as error:
        message = error.message if isinstance(error, ProtocolError) else str(error)
        raise ProtocolError("bad_request", f"published adapter {name!r} does not fit this server: {message}") from None
    assert lora is not None
    return lora


def _evict(store: LoraStore, limits: LoraLimits) -> None:
    """Forget the least recently used published adapters beyond the budget (the newest always stays)."""
    def held() -> int:
        return sum(e.lora.nbytes for e in store.published.values() if e.lora is not None)

    while len(store.published) > 1 and held() > limits.published_bytes:
        store.published.popitem(last=False)


# ---- applying weights in a pass --------------------------------------------------------------------------------------
class HasLora(Protocol):
    @property
    def rows(self) -> int: ...

    @property
    def lora(self) -> ClientLora | None: ...


@dataclass(frozen=True)
class LoraRows:
    """Which rows of a pass use which weights: consecutive parts of (rows, weights or None)."""

    parts: tuple[tuple[int, ClientLora | None], ...]

    @classmethod
    def of(cls, parts: Iterable[tuple[int, ClientLora | None]]) -> LoraRows | None:
        """None where no row has weights (the pass then runs exactly as without LoRA)."""
        parts = tuple(parts)
        return cls(parts) if any(lora is not None for _, lora in parts) else None

    @classmethod
    def uniform(cls, lora: ClientLora | None, rows: int) -> LoraRows | None:
        return cls.of([(rows, lora)])

    def blocks(self, first: int, last: int) -> LoraRows:
        """The same rows over the pass's blocks [first, last) only."""
        return LoraRows(tuple((rows, None if lora is None else lora.blocks(first, last)) for rows, lora in self.parts))

    def hooks(self, block: int) -> dict[str, Hook]:
        """Forward hooks per module path of the pass's block number `block`: each adds its rows' deltas.

        Sessions that generate together meet in pass after pass: the hooks of a group of weights that do not
        train (no autograd) are kept for the next pass (their rows' A and B stacked once)."""
        if any(lora is not None and lora.weights.requires_grad for _, lora in self.parts):
            return self._hooks(block)
        loras = [lora for _, lora in self.parts]
        key = (tuple((rows, None if lora is None else id(lora)) for rows, lora in self.parts), block)
        with _KEPT_LOCK:
            kept = _KEPT.get(key)
            # the same objects, still alive: an id is reused only once its object is gone, and then its ref is dead
            if kept is not None and all((ref is None) == (lora is None) and (ref is None or ref() is lora)
                                        for ref, lora in zip(kept[0], loras, strict=True)):
                _KEPT.move_to_end(key)
                return kept[1]
        hooks = self._hooks(block)
        refs = tuple(None if lora is None else weakref.ref(lora) for lora in loras)
        with _KEPT_LOCK:
            _KEPT[key] = (refs, hooks)
            while len(_KEPT) > KEPT_HOOKS:
                _KEPT.popitem(last=False)
        return hooks

    def _hooks(self, block: int) -> dict[str, Hook]:
        users: dict[str, list[tuple[range, torch.Tensor, torch.Tensor, float]]] = {}
        owners: dict[str, set[int]] = {}
        row = 0
        for rows, lora in self.parts:
            if lora is not None:
                for path, (a, b) in lora.pairs(block).items():
                    users.setdefault(path, []).append((range(row, row + rows), a, b, lora.spec.scaling))
                    owners.setdefault(path, set()).add(id(lora))
            row += rows
        hooks = {}
        for path, using in users.items():
            if len(owners[path]) == 1 and sum(len(rows) for rows, *_ in using) == row:
                hooks[path] = _uniform_delta(*using[0][1:])  # every row, the same weights
            else:
                hooks[path] = _gathered_delta(using)
        return hooks


Hook = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]
KEPT_HOOKS = 128  # (group of weights, block) entries kept between passes, least recently used first out
_KEPT: OrderedDict[tuple[object, int], tuple[tuple[weakref.ref[ClientLora] | None, ...], dict[str, Hook]]] = OrderedDict()
_KEPT_LOCK = threading.Lock()


def blocks_of(lora: LoraRows | None, first: int, last: int) -> LoraRows | None:
    """`lora` over the pass's blocks [first, last) only (None stays None)."""
    return None if lora is None else lora.blocks(first, last)


def rows_of(items: Sequence[HasLora]) -> LoraRows | None:
    """The LoRA rows of a pass over `items` stacked along the batch, in order."""
    return LoraRows.of((item.rows, item.lora) for item in items)


@contextmanager
def applied(layers: nn.ModuleList, lora: LoraRows | None) -> Iterator[None]:
    """While active, each target module of block i of `layers` adds the LoRA deltas of `lora`'s rows."""
    if lora is None:
        yield
        return
    handles = []
    try:
        for index, layer in enumerate(layers):
            for path, hook in lora.hooks(index).items():
                handles.append(layer.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _uniform_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Hook:
    """Every row uses the same A and B: PEFT's own computation."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scaling

    return hook


def _gathered_delta(using: list[tuple[range, torch.Tensor, torch.Tensor, float]]) -> Hook:
    """Rows with different weights (or none): each row's A and B gathered, two batched products, added to those rows."""
    rank = max(a.shape[0] for _, a, _, _ in using)
    device = using[0][1].device
    stacked_a = torch.zeros(len(using), rank, using[0][1].shape[1], device=device)
    stacked_b = torch.zeros(len(using), using[0][2].shape[0], rank, device=device)
    for index, (_, a, b, _) in enumerate(using):  # a smaller rank is padded with zeros: the same products
        stacked_a[index, :a.shape[0]] = a
        stacked_b[index, :, :b.shape[1]] = b
    selected = torch.tensor([row for rows, *_ in using for row in rows], device=device)
    which = torch.tensor([index for index, (rows, *_) in enumerate(using) for _ in rows], device=device)
    scales = torch.tensor([scaling for _, _, _, scaling in using], device=device)[which].view(-1, 1, 1)
    row_a, row_b = stacked_a.index_select(0, which), stacked_b.index_select(0, which)  # [rows, r, in], [rows, out, r]

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).index_select(0, selected)
        low = torch.bmm(rows, row_a.to(x.dtype).transpose(1, 2))
        delta = torch.bmm(low, row_b.to(x.dtype).transpose(1, 2)) * scales.to(x.dtype)
        flat = output.reshape(output.shape[0], -1, output.shape[-1])
        return flat.index_add(0, selected, delta.to(output.dtype)).view(output.shape)

    return hook
