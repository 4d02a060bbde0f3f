"""Who decides which servers the route map lists: its authority. Pure state, no I/O.

The route-map service (:mod:`llmswarm_control.routemap_service`) serves one API over either
authority:

- :class:`Announcements` (the local substrate): every server that announces itself and keeps
  up its heartbeat is listed, with the span and state it announces. The model is the
  one given, else the first one announced.
- :class:`OperatorRecord` (Kubernetes): the operator's record (its ``routes.json``, from the
  API and from the mounted file: the newer counts) says
  *which* servers belong to the swarm and their spans; announcements add what only the
  servers know: measured throughput, free cache, and ``online`` a little before the
  kubelet's view reaches the record. A server that is not in the record is never listed,
  and ``draining`` in the record always wins. With ``outside=True`` (an open swarm), servers
  that joined on their own are listed too, as they announce themselves: every announced id
  that no record of the operator ever listed (a server the operator removed stays unlisted
  while it still announces). The published version starts at the
  record's version and goes up by one whenever what the map says changes (a new record, a
  server coming online), so clients can cache by version.

Both keep announcements in a :class:`~llmswarm_control.routetable.RouteTable` (expiry by
TTL; another model is refused with :class:`~llmswarm_control.routetable.ModelMismatch`).
"""

from __future__ import annotations

from typing import Protocol

from llmswarm_control.routetable import RouteTable
from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord


class Authority(Protocol):
    @property
    def ready(self) -> bool:
        """Whether there is a map to serve (``/readyz``)."""

    def announce(self, announcement: Announcement, now: float) -> bool:
        """Take an announcement or heartbeat; True when the server is listed. Raises ModelMismatch."""

    def leave(self, server_id: str) -> bool:
        """Forget a server's announcement; False when there was none."""

    def expire(self, now: float) -> list[str]:
        """Forget announcements whose heartbeats stopped; their server ids."""

    def snapshot(self) -> RouteMap:
        """The map as it is now."""


class Announcements:
    """Announcements only: the map lists every server that announced itself and has not expired."""

    def __init__(self, model: ModelInfo | None = None) -> None:
        self.table = RouteTable(model)

    @property
    def ready(self) -> bool:
        return True

    def announce(self, announcement: Announcement, now: float) -> bool:
        self.table.announce(announcement, now)
        return True

    def leave(self, server_id: str) -> bool:
        return self.table.remove(server_id)

    def expire(self, now: float) -> list[str]:
        return self.table.expire(now)

    def snapshot(self) -> RouteMap:
        return self.table.snapshot()


def _view(routes: RouteMap) -> tuple[object, ...]:
    """What a client routes by: a change here is a new version."""
    return routes.model, tuple((s.id, s.url, s.start, s.end, s.state) for s in routes.servers)


def merge_record(record: ServerRecord, heard: ServerRecord | None) -> ServerRecord:
    """The operator's record of a server, with what the server itself announced (for the same span)."""
    if heard is None or heard.span != record.span:
        return record
    state = record.state
    if record.state == "joining" and heard.state == "online":
        state = "online"
    elif heard.state == "draining":
        state = "draining"
    return record.model_copy(update={
        "state": state, "throughput": heard.throughput, "cache_tokens_left": heard.cache_tokens_left,
    })


class OperatorRecord:
    """An operator's record plus announcements: the record's servers are listed and, when `outside`, the servers
    that announce themselves and that no record of the operator ever listed."""

    def __init__(self, outside: bool = False) -> None:
        self.outside = outside  # list announced servers that are not the operator's (outside servers)
        self.managed: set[str] = set()  # every id a record of the operator listed: never an outside server
        self.record: RouteMap | None = None
        self.table = RouteTable()
        self._map = RouteMap(model=None, version=0, servers=[])
        self._sources: dict[str, RouteMap] = {}  # the last record of each source (the mounted file, the API)

    @property
    def ready(self) -> bool:
        return self.record is not None

    @property
    def version(self) -> int:
        return self._map.version

    def load(self, record: RouteMap, source: str = "file") -> None:
        """A new record from the operator, read from `source`.

        With two sources (the mounted file, refreshed by the kubelet a minute late, and the API, within a
        second), the newest record of the two is the record: a stale file never brings back a server the
        API's record no longer lists. (If the operator's numbering starts again, the new record counts once
        both sources show it.)
        """
        self._sources[source] = record
        newest = max(self._sources.values(), key=lambda r: r.version)
        if newest == self.record:
            return
        if self.record is None or newest.model != self.record.model:
            self.table = RouteTable(newest.model)  # a new model: old announcements mean nothing
        self.record = newest
        self.managed.update(s.id for s in newest.servers)
        self._publish(adopt=newest.version)

    def listed(self, server_id: str) -> bool:
        if self.record is None:
            return False
        return any(s.id == server_id for s in self.record.servers) or self._outside(server_id)

    def _outside(self, server_id: str) -> bool:
        return self.outside and server_id not in self.managed

    def announce(self, announcement: Announcement, now: float) -> bool:
        self.table.announce(announcement, now)
        self._publish()
        return self.listed(announcement.server.id)

    def leave(self, server_id: str) -> bool:
        removed = self.table.remove(server_id)
        self._publish()
        return removed

    def expire(self, now: float) -> list[str]:
        gone = self.table.expire(now)
        if gone:
            self._publish()
        return gone

    def snapshot(self) -> RouteMap:
        return self._map

    def _publish(self, adopt: int = 0) -> None:
        """Merge the record with the announcements; the version goes up by one when the view changed,
        or to the record's own version while that is ahead (then the record's numbering is adopted)."""
        if self.record is None:
            return
        heard = {s.id: s for s in self.table.snapshot().servers}
        servers = [merge_record(s, heard.get(s.id)) for s in self.record.servers]
        joined = [s for s in heard.values() if self._outside(s.id)]
        if joined:
            servers = sorted([*servers, *joined], key=lambda r: (r.start, r.end, r.id))
        merged = RouteMap(model=self.record.model, version=self._map.version, servers=servers)
        if adopt > self._map.version:
            version = adopt
        else:
            version = self._map.version + (_view(merged) != _view(self._map))
        self._map = merged.model_copy(update={"version": version})
