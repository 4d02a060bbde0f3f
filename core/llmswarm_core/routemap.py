"""The route map: which server holds which span, as published by the route-map service.

``GET /v1/routes`` returns a :class:`RouteMap`. Servers announce themselves with
``POST /v1/servers`` (an :class:`Announcement`), repeated as a heartbeat.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """What a server sends to the route-map service on start and on every heartbeat."""

    model: ModelInfo
    server: ServerRecord
    ttl: Annotated[float, Field(gt=0, le=3600)] = 15.0

    @model_validator(mode="after")
    def _span_inside_model(self) -> Announcement:
        if self.server.end > self.model.num_blocks:
            raise ValueError(f"span [{self.server.start}, {self.server.end}) is outside the model's {self.model.num_blocks} blocks")
        return self


class RouteMap(_Schema):
    model: ModelInfo | None
    version: Annotated[int, Field(ge=0)]
    servers: list[ServerRecord]

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
