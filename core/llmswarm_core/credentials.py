"""Credentials with roles: who may use the swarm, who may join it, who may administer it.

Roles:

- ``use``: read routes, open inference sessions, run forward and backward on block servers;
- ``join``: announce a server to the route map (``POST /v1/servers``);
- ``admin``: ban a server id, revoke a credential.

A credential is a bearer token signed by the swarm's authority key (Ed25519)::

    lsw1.<base64url(JSON claims)>.<base64url(signature)>

with claims ``{"jti": id, "sub": name, "roles": [...], "exp": unix time or null}``. Every
service that checks credentials (route map, block servers) needs only the authority's public
key, no secret; a revoked credential's ``jti`` is listed by the route map and refused
everywhere. The single ``--token`` of a small private swarm stays valid: it holds every role.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from llmswarm_core.identity import IdentityError, ServerIdentity, canonical, verify

Role = Literal["use", "join", "admin"]
ROLES: tuple[Role, ...] = ("use", "join", "admin")
PREFIX = "lsw1"


class CredentialError(ValueError):
    """A credential that cannot be issued or read."""


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a credential's name and roles (``swarm-token`` for the shared token)."""

    name: str
    roles: frozenset[str]
    credential_id: str

    def can(self, role: str) -> bool:
        return role in self.roles


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> tuple[dict[str, object], str]:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or len(token) > 4096:
        raise CredentialError("not an llmswarm credential")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError) as error:
        raise CredentialError(f"unreadable claims: {error}") from None
    if not isinstance(claims, dict):
        raise CredentialError("claims must be a JSON object")
    return claims, parts[2]


class Authority:
    """The swarm's signing key: it issues credentials (kept by ``llmswarm up`` or in an operator's Secret)."""

    def __init__(self, identity: ServerIdentity) -> None:
        self.identity = identity
        self.public_key = identity.public_key

    def issue(self, name: str, roles: Iterable[str], ttl_seconds: float | None = None) -> str:
        roles = sorted(set(roles))
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise CredentialError(f"roles must be some of {', '.join(ROLES)}, got {roles}")
        if not name or len(name) > 128:
            raise CredentialError("a credential needs a name of 1 to 128 characters")
        claims = {"jti": secrets.token_hex(8), "sub": name, "roles": roles,
                  "exp": None if ttl_seconds is None else int(time.time() + ttl_seconds)}
        return f"{PREFIX}.{_b64(canonical(claims))}.{self.identity.sign(claims)}"


class Verifier:
    """Checks bearer tokens: signed credentials of one authority, and the optional shared swarm token."""

    def __init__(self, authority_key: str | None = None, shared_token: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.authority_key = authority_key
        self.shared_token = shared_token
        self.revoked: set[str] = set()
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """False for an open swarm (no token, no authority): every request is allowed."""
        return bool(self.authority_key or self.shared_token)

    def principal(self, header: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer ...`` header, or None when it proves nothing."""
        if not header or not header.startswith("Bearer "):
            return None
        token = header[len("Bearer "):]
        if self.shared_token and hmac.compare_digest(token.encode(), self.shared_token.encode()):
            return Principal("swarm-token", frozenset(ROLES), "swarm-token")
        if not self.authority_key or not token.startswith(PREFIX + "."):
            return None
        try:
            claims, signature = _claims(token)
            verify(self.authority_key, claims, signature)
        except (CredentialError, IdentityError):
            return None
        jti, name, roles, expires = claims.get("jti"), claims.get("sub"), claims.get("roles"), claims.get("exp")
        if not isinstance(jti, str) or not isinstance(name, str) or not isinstance(roles, list):
            return None
        if jti in self.revoked or (isinstance(expires, int | float) and expires < self._clock()):
            return None
        return Principal(name, frozenset(r for r in roles if r in ROLES), jti)


def credential_id(token: str) -> str:
    """The ``jti`` of a credential (what revocation names), without checking its signature."""
    claims, _ = _claims(token)
    jti = claims.get("jti")
    if not isinstance(jti, str):
        raise CredentialError("the credential has no id")
    return jti
