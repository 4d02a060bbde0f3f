"""The wire format: one binary frame per message, no pickle.

A frame is::

    b"LSW1" | header length (uint32, little endian) | header (UTF-8 JSON) | tensor bytes

The header is a JSON object with a ``kind``, message fields, and ``tensors``: a list of
``{"name", "dtype", "shape"}`` in the order their raw bytes follow. Every declared size
is checked against the limits and against the bytes actually present *before* any
tensor is made; tensors are then views over the received buffer (``torch.frombuffer``).

Message kinds (requests -> replies):

* ``open`` {start, end, max_length, batch_size?, wire_dtype?, adapter?, lora?} + lora? -> ``opened`` {session}
* ``step`` {session, push?} + hidden, attention_mask?, position_ids? -> ``output`` {session, pushed?} + hidden
* ``push`` {session, key, position, request_id, push?} + hidden, attention_mask?, position_ids?: a server
  hands its output to the next server of the client's chain (``/v1/push``); that server answers on
  the client's own session connection, with the client's ``request_id``
* ``close`` {session} -> ``closed`` {session}
* ``forward`` {start, end, wire_dtype?, adapter?, lora?} + hidden, attention_mask?, position_ids?, prompts?, lora?
  -> ``output`` + hidden
* ``backward`` {start, end, wire_dtype?, adapter?, lora?} + hidden, attention_mask?, position_ids?, prompts?, lora?,
  grad_output -> ``gradients`` + grad_hidden, grad_prompts?, grad_lora?

``adapter`` names a LoRA adapter that the server hosts; ``lora`` (a :class:`~llmswarm_core.lora.LoraSpec`) with
the tensor ``lora`` carries the client's own LoRA weights for the request's blocks (lora.py: layout and rules).
* any request -> ``error`` {code, message, retryable}
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmswarm_core.lora import LoraSpec

MAGIC = b"LSW1"
_PREFIX = struct.Struct("<4sI")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_DTYPES = ("int64", "int32", "bool")
WireDtype = Literal["float32", "float16", "bfloat16"]


class ProtocolError(Exception):
    """A request that cannot be served, with a code the client can act on."""

    status = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "too_large": 413,
              "overloaded": 503, "internal": 500}

    def __init__(self, code: str, message: str, retryable: bool | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = code in ("overloaded", "internal") if retryable is None else retryable
        self.retry_after = retry_after  # seconds a client should wait before asking again

    @property
    def http_status(self) -> int:
        return self.status.get(self.code, 500)

    def to_header(self) -> dict[str, Any]:
        header = {"kind": "error", "code": self.code, "message": self.message, "retryable": self.retryable}
        if self.retry_after is not None:
            header["retry_after"] = self.retry_after
        return header


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds checked before anything is allocated."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 8
    max_ndim: int = 4
    max_tensor_bytes: int = 256 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


NonNegInt = Annotated[int, Field(ge=0, le=2**31)]
AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]  # hosted or published


class TensorSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32", "bool"]
    shape: list[NonNegInt]


class OpenRequest(_Strict):
    kind: Literal["open"]
    start: NonNegInt
    end: NonNegInt
    max_length: Annotated[int, Field(ge=1, le=2**31)]
    batch_size: Annotated[int, Field(ge=1, le=2**31)] = 1
    wire_dtype: WireDtype = "float32"
    adapter: AdapterName | None = None
    lora: LoraSpec | None = None  # the client's LoRA weights come with the open, in the tensor "lora"
    request_id: NonNegInt | None = None


class PushTarget(_Strict):
    """Where a server sends a step's output: the next hop's server, session and the step's request id there;
    `push` goes on from that server (the rest of the chain)."""

    url: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^https?://[^\s/]+(/[A-Za-z0-9_.\-]+)*$")]
    session: NonNegInt
    key: Annotated[str, Field(min_length=16, max_length=64)]
    request_id: NonNegInt
    position: NonNegInt  # tokens the session holds before this step: a stale or repeated push is refused
    push: PushTarget | None = None


class StepRequest(_Strict):
    kind: Literal["step"]
    session: NonNegInt
    request_id: NonNegInt | None = None
    push: PushTarget | None = None


class PushRequest(_Strict):
    kind: Literal["push"]
    session: NonNegInt
    key: Annotated[str, Field(min_length=16, max_length=64)]
    request_id: NonNegInt
    position: NonNegInt
    push: PushTarget | None = None


class CloseRequest(_Strict):
    kind: Literal["close"]
    session: NonNegInt
    request_id: NonNegInt | None = None


class _Stateless(_Strict):
    start: NonNegInt
    end: NonNegInt
    wire_dtype: WireDtype = "float32"
    adapter: AdapterName | None = None
    lora: LoraSpec | None = None  # the client's LoRA weights for blocks [start, end), in the tensor "lora"
    request_id: NonNegInt | None = None


class ForwardRequest(_Stateless):
    kind: Literal["forward"]


class BackwardRequest(_Stateless):
    kind: Literal["backward"]


SessionRequest = OpenRequest | StepRequest | CloseRequest


# ---- replies -------------------------------------------------------------------------------------------------------
# Replies are checked on the client as requests are on the server: a reply that does not fit its type is a
# server defect, reported as ProtocolError("internal") rather than a KeyError deep inside the client.


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpenedReply(_Reply):
    kind: Literal["opened"] = "opened"
    session: NonNegInt
    push_key: Annotated[str, Field(min_length=16, max_length=64)] | None = None  # None: the server takes no pushes
    request_id: NonNegInt | None = None


class OutputReply(_Reply):
    """A step's or a stateless forward's output (tensor ``hidden``)."""

    kind: Literal["output"] = "output"
    session: NonNegInt | None = None
    request_id: NonNegInt | None = None
    pushed: bool | None = None  # the server handed the output on to the next server too


class ClosedReply(_Reply):
    kind: Literal["closed"] = "closed"
    session: NonNegInt
    request_id: NonNegInt | None = None


class GradientsReply(_Reply):
    """A backward's result (tensors ``grad_hidden`` and, with deep prompts, ``grad_prompts``; with a client's
    LoRA weights, ``grad_lora``)."""

    kind: Literal["gradients"] = "gradients"
    request_id: NonNegInt | None = None


class ErrorReply(_Reply):
    kind: Literal["error"] = "error"
    code: Annotated[str, Field(min_length=1, max_length=64)]
    message: Annotated[str, Field(max_length=64 * 1024)] = ""
    retryable: bool = False
    retry_after: Annotated[float, Field(ge=0, le=3600)] | None = None
    request_id: NonNegInt | None = None


Reply = OpenedReply | OutputReply | ClosedReply | GradientsReply
_REPLIES: dict[str, type[_Reply]] = {"opened": OpenedReply, "output": OutputReply, "closed": ClosedReply, "gradients": GradientsReply}


def reply_frame(reply: Reply | ErrorReply, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Encode a typed reply (the server side of :func:`parse_reply`)."""
    return encode(reply.model_dump(exclude_none=True), tensors)


def request_frame(request: _Strict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Encode a typed request (the client side of :func:`parse_request`)."""
    return encode(request.model_dump(exclude_none=True), tensors)


def parse_reply(frame: Frame, expected: type[_ReplyT]) -> _ReplyT:
    """On the client: an ``error`` reply raises its ProtocolError; any other must be an `expected` reply."""
    raise_if_error(frame)
    if frame.kind != expected.model_fields["kind"].default:
        raise ProtocolError("internal", f"unexpected reply {frame.kind!r}, expected {expected.model_fields['kind'].default!r}")
    try:
        return expected.model_validate(frame.header)
    except ValidationError as error:
        raise ProtocolError("internal", f"malformed {frame.kind} reply: {_first_error(error)}") from None


_REQUESTS: dict[str, type[_Strict]] = {
    "open": OpenRequest,
    "step": StepRequest,
    "close": CloseRequest,
    "push": PushRequest,
    "forward": ForwardRequest,
    "backward": BackwardRequest,
}


_ReplyT = TypeVar("_ReplyT", bound="_Reply")


@dataclass
class Frame:
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.header.get("kind"))


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """Serialize a header and named tensors into one frame."""
    tensors = tensors or {}
    specs, payloads = [], []
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire does not carry")
        tensor = tensor.detach().contiguous().cpu()
        specs.append({"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)})
        payloads.append(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(head)), head, *payloads])


def decode(data: bytes, limits: WireLimits = WireLimits()) -> Frame:
    """Parse and check one frame; raise ProtocolError('bad_request' or 'too_large') on any defect."""
    if len(data) < _PREFIX.size:
        raise ProtocolError("bad_request", f"frame of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad_request", f"bad magic {magic!r}, expected {MAGIC!r}")
    if head_len > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {head_len} bytes exceeds {limits.max_header_bytes}")
    body_start = _PREFIX.size + head_len
    if body_start > len(data):
        raise ProtocolError("bad_request", f"truncated frame: header declares {head_len} bytes, {len(data) - _PREFIX.size} present")
    try:
        header = json.loads(data[_PREFIX.size:body_start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError("bad_request", f"header is not UTF-8 JSON: {error}") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits (sys.get_int_max_str_digits)
        raise ProtocolError("bad_request", f"header has a value that cannot be read: {error}") from None
    except RecursionError:
        raise ProtocolError("bad_request", "header nests too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ProtocolError("bad_request", "header must be a JSON object with a string 'kind'")
    raw_specs = header.pop("tensors", [])
    if not isinstance(raw_specs, list) or len(raw_specs) > limits.max_tensors:
        raise ProtocolError("bad_request", f"'tensors' must be a list of at most {limits.max_tensors} entries")
    try:
        specs = [TensorSpec.model_validate(s) for s in raw_specs]
    except ValidationError as error:
        raise ProtocolError("bad_request", f"bad tensor description: {_first_error(error)}") from None
    offset = body_start
    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name in tensors:
            raise ProtocolError("bad_request", f"tensor {spec.name!r} appears twice")
        if len(spec.shape) > limits.max_ndim:
            raise ProtocolError("bad_request", f"tensor {spec.name!r} has {len(spec.shape)} dims, at most {limits.max_ndim}")
        dtype = DTYPES[spec.dtype]
        nbytes = math.prod(spec.shape) * dtype.itemsize
        if nbytes > limits.max_tensor_bytes:
            raise ProtocolError("too_large", f"tensor {spec.name!r} declares {nbytes} bytes, limit {limits.max_tensor_bytes}")
        if offset + nbytes > len(data):
            raise ProtocolError("bad_request", f"truncated frame: tensor {spec.name!r} needs {nbytes} bytes, {len(data) - offset} left")
        if nbytes:
            flat = torch.frombuffer(bytearray(data[offset:offset + nbytes]), dtype=dtype)
        else:
            flat = torch.empty(0, dtype=dtype)
        tensors[spec.name] = flat.view(spec.shape)
        offset += nbytes
    if offset != len(data):
        raise ProtocolError("bad_request", f"{len(data) - offset} bytes after the last declared tensor")
    return Frame(header, tensors)


def parse_request(frame: Frame, allowed: tuple[str, ...]) -> Any:
    """Validate a request header against its message type."""
    if frame.kind not in allowed:
        raise ProtocolError("bad_request", f"unexpected message kind {frame.kind!r} (expected one of {', '.join(allowed)})")
    try:
        return _REQUESTS[frame.kind].model_validate(frame.header)
    except ValidationError as error:
        raise ProtocolError("bad_request", f"bad {frame.kind} message: {_first_error(error)}") from None


def raise_if_error(frame: Frame) -> Frame:
    """On the client: turn an ``error`` reply into a ProtocolError."""
    if frame.kind == "error":
        try:
            error = ErrorReply.model_validate(frame.header)
        except ValidationError as bad:
            raise ProtocolError("internal", f"malformed error reply: {_first_error(bad)}") from None
        raise ProtocolError(error.code, error.message, error.retryable, error.retry_after)
    return frame


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    return f"{where}: {first.get('msg')}"
