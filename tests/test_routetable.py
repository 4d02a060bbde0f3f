"""The route map's state: versions, expiry, model consistency (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmswarm_control.routetable import ModelMismatch, RouteTable
from llmswarm_core.routemap import Announcement, ModelInfo, RouteMap, ServerRecord

MODEL = ModelInfo(name="m", num_blocks=30, hidden_size=8)


def announce(table: RouteTable, sid: str, start: int, end: int, state: str = "online", now: float = 0.0,
             throughput: float = 1.0) -> None:
    record = ServerRecord(id=sid, url=f"http://h/{sid}", start=start, end=end, state=state, throughput=throughput)
    table.announce(Announcement(model=MODEL, server=record, ttl=10), now=now)


def test_version_changes_only_when_routing_changes():
    table = RouteTable()
    announce(table, "a", 0, 10)
    assert table.version == 1
    announce(table, "a", 0, 10, throughput=5.0, now=1)
    assert table.version == 1
    announce(table, "a", 0, 10, state="draining", now=2)
    assert table.version == 2
    assert table.remove("a") and table.version == 3
    assert not table.remove("a")


def test_expiry_and_coverage():
    table = RouteTable(MODEL)
    announce(table, "a", 0, 10, now=0)
    announce(table, "b", 10, 30, now=5)
    assert table.snapshot().coverage() == [1] * 30
    assert table.expire(now=12) == ["a"]
    snapshot = table.snapshot()
    assert [s.id for s in snapshot.servers] == ["b"]
    assert snapshot.coverage()[:10] == [0] * 10


def test_other_model_is_refused():
    table = RouteTable(MODEL)
    other = Announcement(model=ModelInfo(name="x", num_blocks=30, hidden_size=8),
                         server=ServerRecord(id="a", url="http://h", start=0, end=1, state="online"))
    with pytest.raises(ModelMismatch):
        table.announce(other)


def test_schema_rejects_bad_records():
    with pytest.raises(ValidationError):
        ServerRecord(id="a", url="http://h", start=5, end=5, state="online")
    with pytest.raises(ValidationError):
        ServerRecord(id="a", url="ftp://h", start=0, end=5, state="online")
    with pytest.raises(ValidationError):
        ServerRecord(id="a", url="http://h", start=0, end=5, state="sleeping")
    with pytest.raises(ValidationError):
        RouteMap(model=MODEL, version=0, servers=[ServerRecord(id="a", url="http://h", start=0, end=31, state="online")])
