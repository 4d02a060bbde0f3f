"""Timestamps as Kubernetes writes them (RFC 3339, UTC), to and from epoch seconds. Pure."""

from __future__ import annotations

import datetime
import time


def iso(epoch: float, fraction: bool = False) -> str:
    """``2026-12-03T09:19:45Z``; with `fraction`, microseconds too (annotations that need them)."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ")


def now_iso() -> str:
    return iso(time.time())


def epoch(text: object) -> float | None:
    """Epoch seconds of an RFC 3339 time; None when it is empty or not one."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
