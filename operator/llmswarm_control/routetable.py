"""The route map's state: announced servers, their expiry and the map's version. Pure, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass

from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord


class ModelMismatch(ValueError):
    """A server announced a different model than the one this route map serves."""


@dataclass
class _Entry:
    record: ServerRecord
    expires: float


class RouteTable:
    def __init__(self, model: ModelInfo | None = None) -> None:
        self.model = model
        self.version = 0
        self._entries: dict[str, _Entry] = {}

    def _routing_view(self, record: ServerRecord) -> tuple[object, ...]:
        return record.url, record.start, record.end, record.state

    def announce(self, announcement: Announcement, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.model is None:
            self.model = announcement.model
        elif announcement.model != self.model:
            raise ModelMismatch(f"this route map serves {self.model.model_dump()}, not {announcement.model.model_dump()}")
        record = announcement.server
        old = self._entries.get(record.id)
        if old is None or self._routing_view(old.record) != self._routing_view(record):
            self.version += 1
        self._entries[record.id] = _Entry(record, now + announcement.ttl)

    def remove(self, server_id: str) -> bool:
        if self._entries.pop(server_id, None) is None:
            return False
        self.version += 1
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        gone = [sid for sid, entry in self._entries.items() if entry.expires < now]
        for sid in gone:
            del self._entries[sid]
        if gone:
            self.version += 1
        return gone

    def snapshot(self) -> RouteMap:
        servers = sorted((e.record for e in self._entries.values()), key=lambda r: (r.start, r.end, r.id))
        return RouteMap(model=self.model, version=self.version, servers=servers)
