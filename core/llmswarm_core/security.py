"""The optional swarm token and TLS, shared by block servers, the route map and clients.

With a token set, every RPC (``/v1/...``) and ``/info`` require ``Authorization: Bearer
<token>``; a missing or wrong token gets a bare 401 that reveals nothing else. Probes
(``/healthz``, ``/readyz``) and ``/metrics`` stay open for kubelets and Prometheus, and a
server's ``/v1/identity`` (its id and public key, a challenge signed) for the route map.
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from llmswarm_core.credentials import Principal, Role, Verifier

TOKEN_ENV = "LLMSWARM_TOKEN"
AUTHORITY_ENV = "LLMSWARM_AUTHORITY_KEY"  # the public key that signs the swarm's credentials (credentials.py)
PRINCIPAL = web.RequestKey("principal", Principal)  # who sent a request that passed access_middleware
# /v1/identity answers a challenge with the server's id and public key only: the route map checks addresses with it.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/identity"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_from_env(explicit: str | None) -> str | None:
    """The token given on the command line, else $LLMSWARM_TOKEN, else None."""
    return explicit or os.environ.get(TOKEN_ENV) or None


def authority_from_env(explicit: str | None) -> str | None:
    """The credentials' authority key given on the command line, else $LLMSWARM_AUTHORITY_KEY, else None."""
    return explicit or os.environ.get(AUTHORITY_ENV) or None


def token_ok(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


def token_middleware(token: str | None, open_paths: frozenset[str] = OPEN_PATHS) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The shared token on every path but `open_paths` (a swarm of one credential)."""
    return access_middleware(Verifier(shared_token=token), lambda request: None if request.path in open_paths else "use")


def access_middleware(verifier: Verifier, role_of: Callable[[web.Request], Role | tuple[Role, ...] | None],
                      refused: Callable[[str], None] | None = None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Requests need a credential holding the role `role_of` names, or one of the roles (None: open to all), when
    `verifier` checks any.

    A missing, unknown, expired or revoked credential gets a bare 401; a valid one without the role a 403 that
    names the role. `refused` is told why (``credential`` or ``role``), for the service's refusal counter."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        role = role_of(request)
        if role is None or not verifier.enabled:
            return await handler(request)
        principal = verifier.principal(request.headers.get("Authorization"))
        if principal is None:
            if refused is not None:
                refused("credential")
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        roles = role if isinstance(role, tuple) else (role,)
        if not any(principal.can(r) for r in roles):
            if refused is not None:
                refused("role")
            return web.json_response({"error": f"this credential does not hold the {' or '.join(roles)} role"},
                                     status=403)
        request[PRINCIPAL] = principal
        return await handler(request)

    return check


class PlainCredentialWarning(UserWarning):
    """A credential about to cross a network in the clear: plain http to an address that is not loopback."""


def sends_credential_in_clear(url: str, token: str | None) -> bool:
    """Whether a request with `token` to `url` would show the credential to anyone on the path."""
    parts = urlsplit(url)
    if not token or parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def server_ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """TLS for a server from a certificate chain and its key (PEM files), or None for plain HTTP."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_ssl_context(ca: str | None) -> ssl.SSLContext:
    """Verify servers against `ca` (a PEM bundle), or the system's trust store."""
    return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
