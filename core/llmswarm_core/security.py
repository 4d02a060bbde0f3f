"""The optional swarm token and TLS, shared by block servers, the route map and clients.

With a token set, every RPC (``/v1/...``) and ``/info`` require ``Authorization: Bearer
<token>``; a missing or wrong token gets a bare 401 that reveals nothing else. Probes
(``/healthz``, ``/readyz``) and ``/metrics`` stay open for kubelets and Prometheus.
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

TOKEN_ENV = "LLMSWARM_TOKEN"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_from_env(explicit: str | None) -> str | None:
    """The token given on the command line, else $LLMSWARM_TOKEN, else None."""
    return explicit or os.environ.get(TOKEN_ENV) or None


def token_ok(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


def token_middleware(token: str | None, open_paths: frozenset[str] = OPEN_PATHS) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path not in open_paths and not token_ok(request.headers.get("Authorization"), token):
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


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
