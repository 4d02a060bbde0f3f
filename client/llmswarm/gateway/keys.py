"""The gateway's API keys: many, stored hashed, revocable, each with its own rate limit and usage metrics.

A key file (``llmswarm gateway --api-keys FILE``) is JSON::

    {"keys": [{"name": "alice", "sha256": "<hex digest of the key>", "requests_per_minute": 60,
               "revoked": false}]}

``llmswarm gateway-keys create --file FILE --name alice [--requests-per-minute 60]`` adds a key
and prints it once; only its SHA-256 is kept. ``llmswarm gateway-keys revoke --file FILE --name
alice`` revokes it. The gateway re-reads the file when it changes, so a revocation takes
effect within a second, without a restart. These keys are only the gateway's: they are never
sent to the swarm, and a swarm credential is not a gateway key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "sk-lsw-"


class KeyFileError(ValueError):
    """A key file that cannot be read or changed."""


@dataclass
class ApiKey:
    name: str
    sha256: str
    requests_per_minute: int | None = None
    revoked: bool = False


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class _Bucket:
    """A token bucket: `rate` requests a minute, bursts up to that many."""

    rate: int
    level: float
    at: float

    def take(self, now: float) -> float:
        """0 when a request may go now, else seconds until one may."""
        self.level = min(float(self.rate), self.level + (now - self.at) * self.rate / 60.0)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) * 60.0 / self.rate


@dataclass
class KeyStore:
    """The keys of a file, re-read when it changes; looks a presented key up by its digest."""

    path: Path
    keys: dict[str, ApiKey] = field(default_factory=dict)  # sha256 -> key
    _mtime: float = -1.0
    _checked: float = 0.0
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        store = cls(Path(path))
        store.refresh(force=True)
        return store

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed (checked at most once a second)."""
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
        except OSError as error:
            raise KeyFileError(f"cannot read the API key file {self.path}: {error}") from None
        if mtime != self._mtime or force:
            self.keys = {k.sha256: k for k in read_keys(self.path)}
            self._mtime = mtime

    def find(self, presented: str) -> ApiKey | None:
        """The live key whose digest matches (compared in constant time), or None."""
        self.refresh()
        wanted = digest(presented)
        for known, key in self.keys.items():
            if hmac.compare_digest(known, wanted):
                return None if key.revoked else key
        return None

    def wait_for(self, key: ApiKey, now: float | None = None) -> float:
        """0 when `key` may send a request now (and it is counted), else seconds until it may."""
        if key.requests_per_minute is None:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key.name)
            if bucket is None or bucket.rate != key.requests_per_minute:
                bucket = self._buckets[key.name] = _Bucket(key.requests_per_minute, float(key.requests_per_minute), now)
            return bucket.take(now)


def read_keys(path: Path) -> list[ApiKey]:
    try:
        data = json.loads(Path(path).read_text())
        entries = data["keys"]
        keys = [ApiKey(name=str(e["name"]), sha256=str(e["sha256"]),
                       requests_per_minute=None if e.get("requests_per_minute") is None else int(e["requests_per_minute"]),
                       revoked=bool(e.get("revoked", False))) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeyFileError(f"{path} is not an API key file: {error!r}") from None
    for key in keys:
        if len(key.sha256) != 64 or (key.requests_per_minute is not None and key.requests_per_minute < 1):
            raise KeyFileError(f"{path}: key {key.name!r} needs a 64-hex sha256 and a rate of at least 1 a minute")
    return keys


def write_keys(path: Path, keys: list[ApiKey]) -> None:
    """Write the key file atomically, readable by its owner only."""
    path = Path(path)
    body = {"keys": [{"name": k.name, "sha256": k.sha256, "requests_per_minute": k.requests_per_minute,
                      "revoked": k.revoked} for k in keys]}
    tmp = path.with_name(path.name + ".tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(body, handle, indent=1)
    os.replace(tmp, path)


def create_key(path: Path, name: str, requests_per_minute: int | None = None) -> str:
    """Add a key named `name` to the file (created if missing); returns the key, which is not kept anywhere."""
    keys = read_keys(path) if Path(path).exists() else []
    if any(k.name == name for k in keys):
        raise KeyFileError(f"{path} already has a key named {name!r}")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise KeyFileError("a key name has 1 to 64 letters, digits, '-', '_' or '.'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    keys.append(ApiKey(name, digest(key), requests_per_minute))
    write_keys(path, keys)
    return key


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise KeyFileError(f"{path} has no key named {name!r}")
    write_keys(path, [ApiKey(k.name, k.sha256, k.requests_per_minute, k.revoked or k.name == name) for k in keys])
