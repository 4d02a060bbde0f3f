"""The route map's state: versions, expiry, model consistency, and its two authorities (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmswarm_control.routemap_authority import Announcements, OperatorRecord, merge_record
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


# ---- authorities ------------------------------------------------------------------------------------------------------


def server(sid: str, start: int, end: int, state: str = "online", throughput: float = 0.0) -> ServerRecord:
    return ServerRecord(id=sid, url=f"http://h/{sid}", start=start, end=end, state=state, throughput=throughput)  # type: ignore[arg-type]


def heard(sid: str, start: int, end: int, state: str = "online", throughput: float = 1.0) -> Announcement:
    return Announcement(model=MODEL, server=server(sid, start, end, state, throughput), ttl=10)


def states(routes: RouteMap) -> dict[str, str]:
    return {s.id: s.state for s in routes.servers}


def test_announcements_list_every_announced_server():
    authority = Announcements()
    assert authority.ready and authority.snapshot().model is None
    assert authority.announce(heard("a", 0, 10), now=0) is True
    assert authority.announce(heard("b", 10, 30), now=5) is True
    routes = authority.snapshot()
    assert routes.model == MODEL and states(routes) == {"a": "online", "b": "online"} and routes.version == 2
    assert authority.expire(now=12) == ["a"] and states(authority.snapshot()) == {"b": "online"}
    assert authority.leave("b") and not authority.leave("b")
    assert authority.snapshot().servers == [] and authority.snapshot().version == 4


def test_operator_record_lists_only_its_servers_and_numbers_from_the_record():
    authority = OperatorRecord()
    assert not authority.ready and authority.snapshot().servers == []
    authority.load(RouteMap(model=MODEL, version=4, servers=[server("a", 0, 15), server("b", 15, 30, "joining")]))
    assert authority.ready and authority.version == 4
    assert states(authority.snapshot()) == {"a": "online", "b": "joining"}

    # b is online by its own word (and says how fast it is): a new version, one up.
    assert authority.announce(heard("b", 15, 30, throughput=12.5), now=0) is True
    routes = authority.snapshot()
    assert states(routes) == {"a": "online", "b": "online"} and routes.version == 5
    assert next(s.throughput for s in routes.servers if s.id == "b") == 12.5
    # A heartbeat with only a new throughput is not a new version.
    authority.announce(heard("b", 15, 30, throughput=13.0), now=1)
    assert authority.version == 5

    # A server the record does not hold is never listed, and changes nothing.
    assert authority.announce(heard("rogue", 0, 30), now=1) is False
    assert "rogue" not in states(authority.snapshot()) and authority.version == 5

    # The record drains a; a's own "online" does not win. The record is ahead: its version is adopted.
    authority.announce(heard("a", 0, 15), now=1)
    authority.load(RouteMap(model=MODEL, version=9, servers=[server("a", 0, 15, "draining"), server("b", 15, 30, "joining")]))
    assert states(authority.snapshot()) == {"a": "draining", "b": "online"} and authority.version == 9

    # A record behind our numbering still counts: the version goes up by one.
    authority.load(RouteMap(model=MODEL, version=7, servers=[server("b", 15, 30, "joining")]))
    assert states(authority.snapshot()) == {"b": "online"} and authority.version == 10

    # b's heartbeat stops: the record's "joining" again, a new version.
    assert sorted(authority.expire(now=100)) == ["a", "b", "rogue"]
    assert states(authority.snapshot()) == {"b": "joining"} and authority.version == 11
    assert not authority.leave("b")


def test_operator_record_forgets_announcements_of_another_model():
    authority = OperatorRecord()
    authority.load(RouteMap(model=MODEL, version=1, servers=[server("a", 0, 30, "joining")]))
    authority.announce(heard("a", 0, 30), now=0)
    with pytest.raises(ModelMismatch):
        authority.announce(Announcement(model=ModelInfo(name="x", num_blocks=30, hidden_size=8), server=server("a", 0, 30)), now=0)
    other = ModelInfo(name="y", num_blocks=30, hidden_size=8)
    authority.load(RouteMap(model=other, version=1, servers=[server("a", 0, 30, "joining")]))
    routes = authority.snapshot()
    assert routes.model == other and states(routes) == {"a": "joining"} and routes.version == 3  # a's "online" is gone


def test_merge_record_trusts_the_record_on_spans_and_draining():
    listed = server("a", 0, 15, "joining")
    assert merge_record(listed, None) is listed
    assert merge_record(listed, server("a", 0, 10, "online")) is listed  # another span: an old process
    assert merge_record(listed, server("a", 0, 15, "online")).state == "online"
    assert merge_record(listed, server("a", 0, 15, "draining")).state == "draining"
    assert merge_record(server("a", 0, 15, "draining"), server("a", 0, 15, "online")).state == "draining"
