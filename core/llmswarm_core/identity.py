"""Server identities: an Ed25519 key pair per server, an id derived from its public key, signatures.

A server creates its key pair on first start and keeps it (a file with mode 0600; on
Kubernetes, a Secret). Its id is ``srv-`` and the first 20 characters of the base32 SHA-256 of
its public key, so nobody can announce an id without holding its private key: the route map
checks that the announced public key hashes to the announced id and that the announcement is
signed by it. Signatures cover a canonical JSON encoding (sorted keys, no spaces), so both
sides sign and check the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ID_PREFIX = "srv-"
_ID_LENGTH = 20


class IdentityError(ValueError):
    """A key that cannot be read, or a signature or id that does not check out."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as error:
        raise IdentityError(f"not base64url: {error}") from None


def canonical(payload: Any) -> bytes:
    """The bytes that are signed: JSON with sorted keys and no spaces; NaN and infinities are refused."""
    try:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as error:
        raise IdentityError(f"cannot sign this payload: {error}") from None


def id_of(public_key: str) -> str:
    """The server id that belongs to a public key (base64url of the raw 32 bytes)."""
    raw = _unb64(public_key)
    if len(raw) != 32:
        raise IdentityError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    digest = base64.b32encode(hashlib.sha256(raw).digest()).decode().lower()
    return ID_PREFIX + digest[:_ID_LENGTH]


def verify(public_key: str, payload: Any, signature: str) -> None:
    """Raise IdentityError unless `signature` is the key's signature of `payload`."""
    raw = _unb64(public_key)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(_unb64(signature), canonical(payload))
    except (InvalidSignature, ValueError) as error:
        raise IdentityError(f"bad signature: {type(error).__name__}") from None


class ServerIdentity:
    """A server's key pair: load it, or create and keep it on first start."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = _b64(raw)
        self.server_id = id_of(self.public_key)

    @classmethod
    def generate(cls) -> ServerIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> ServerIdentity:
        """The key kept at `path` (PEM, PKCS#8), created with mode 0600 if there is none."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as error:
                raise IdentityError(f"{path} is not a private key: {error}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity.private_pem()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        return identity

    def private_pem(self) -> bytes:
        """The private key as PEM (PKCS#8), as load_or_create reads it: to keep it (a file, a Secret)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def sign(self, payload: Any) -> str:
        return _b64(self._key.sign(canonical(payload)))
