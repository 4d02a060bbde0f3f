"""The route map: which server holds which span, as published by the route-map service.

``GET /v1/routes`` returns a :class:`RouteMap`. Servers announce themselves with
``POST /v1/servers`` (an :class:`Announcement`), repeated as a heartbeat.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmswarm_core.identity import IdentityError, ServerIdentity, verify
from llmswarm_core.spans import coverage

ServerState = Literal["joining", "online", "draining"]
STATES: tuple[ServerState, ...] = ("joining", "online", "draining")
MAX_THROUGHPUT = 1e7  # tokens/s a server may claim for its span


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Schema):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    num_blocks: Annotated[int, Field(ge=1)]
    hidden_size: Annotated[int, Field(ge=1)]


class ServerRecord(_Schema):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=1)]
    state: ServerState
    # Inference tokens/s through the whole span: finite, and below anything hardware reaches (a bound on lies).
    throughput: Annotated[float, Field(ge=0, le=MAX_THROUGHPUT, allow_inf_nan=False)] = 0.0
    dtype: str = "float32"
    cache_tokens_left: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _span(self) -> ServerRecord:
        if self.start >= self.end:
            raise ValueError(f"empty span [{self.start}, {self.end})")
        return self

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


class Announcement(_Schema):
    """What a server sends to the route-map service on start and on every heartbeat.

    A signed announcement carries the server's public key and its signature over everything
    else (:meth:`signed`); the route map checks that the key speaks for the server's id.
    """

    model: ModelInfo
    server: ServerRecord
    ttl: Annotated[float, Field(gt=0, le=3600)] = 15.0
    public_key: Annotated[str, Field(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    signature: Annotated[str, Field(min_length=86, max_length=86, pattern=r"^[A-Za-z0-9_-]+$")] | None = None

    @model_validator(mode="after")
    def _span_inside_model(self) -> Announcement:
        if self.server.end > self.model.num_blocks:
            raise ValueError(f"span [{self.server.start}, {self.server.end}) is outside the model's {self.model.num_blocks} blocks")
        return self

    def signed_payload(self) -> dict[str, object]:
        """What the signature covers: the whole announcement, its public key included, but the signature."""
        return self.model_dump(mode="json", exclude={"signature"})

    def signed(self, identity: ServerIdentity) -> Announcement:
        with_key = self.model_copy(update={"public_key": identity.public_key, "signature": None})
        return with_key.model_copy(update={"signature": identity.sign(with_key.signed_payload())})

    def check_signature(self) -> None:
        """Raise IdentityError unless the announcement is signed by the key it carries."""
        if self.public_key is None or self.signature is None:
            raise IdentityError("the announcement is not signed")
        verify(self.public_key, self.signed_payload(), self.signature)


class IdentityProof(_Schema):
    """A server's answer to ``GET /v1/identity?challenge=...``: it holds the key, and this address is its."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    public_key: Annotated[str, Field(min_length=43, max_length=43)]
    signature: Annotated[str, Field(min_length=86, max_length=86)]

    @staticmethod
    def payload(challenge: str, server_id: str, url: str) -> dict[str, str]:
        return {"challenge": challenge, "id": server_id, "url": url}

    @classmethod
    def answer(cls, identity: ServerIdentity, server_id: str, challenge: str, url: str) -> IdentityProof:
        return cls(id=server_id, public_key=identity.public_key,
                   signature=identity.sign(cls.payload(challenge, server_id, url)))

    def check(self, challenge: str, server_id: str, url: str, public_key: str) -> None:
        """Raise IdentityError unless this proves that `public_key`'s holder answers as `server_id` at `url`."""
        if self.id != server_id or self.public_key != public_key:
            raise IdentityError(f"the address answered as {self.id}, not {server_id}")
        verify(public_key, self.payload(challenge, server_id, url), self.signature)


class RouteMap(_Schema):
    model: ModelInfo | None
    version: Annotated[int, Field(ge=0)]
    servers: list[ServerRecord]
    # Ids of credentials an admin revoked: block servers refuse them too (they read the map every few seconds).
    revoked: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=10_000)] = []

    @model_validator(mode="after")
    def _spans_inside_model(self) -> RouteMap:
        if self.model is not None:
            for server in self.servers:
                if server.end > self.model.num_blocks:
                    raise ValueError(f"server {server.id} span ends at {server.end} > {self.model.num_blocks} blocks")
        return self

    def coverage(self, states: tuple[str, ...] = ("online",)) -> list[int]:
        """Number of servers in `states` covering each block."""
        if self.model is None:
            return []
        return coverage(self.model.num_blocks, [s.span for s in self.servers if s.state in states])
