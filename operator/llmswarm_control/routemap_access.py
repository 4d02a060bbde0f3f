"""Who may do what at the route map, and its admin endpoints. The roles (credentials.py):

- ``use``: read routes and published adapters, publish adapters (clients), delete one's own;
- ``join``: announce a server and leave (``POST /v1/servers``, ``DELETE /v1/servers/{id}``);
- ``admin``: replace or delete anyone's published adapter; ``POST /v1/admin/bans`` ``{"server_id": ...}`` takes a
  server out of the map and refuses its id
  from then on; ``POST /v1/admin/revocations`` ``{"credential_id": ...}`` refuses a credential (its ``jti``)
  here at once and at every block server within a few seconds: the map lists revoked ids
  (``RouteMap.revoked``) and servers read it with their push peers.

Probes and ``/metrics`` stay open; ``/v1/targets`` (Prometheus' service discovery) lists addresses: ``use``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmswarm_control.server_identities import IdentityBook
from llmswarm_core.credentials import Role, Verifier
from llmswarm_core.relay import ACCEPT_PATH, ATTACH_PATH, RELAY_PREFIX
from llmswarm_core.security import OPEN_PATHS

MAX_REVOKED = 10_000  # revoked credential ids the map lists (beyond it, rotate the authority key)
_ID = r"^[A-Za-z0-9_.:-]{1,256}$"
T = TypeVar("T", bound=BaseModel)


def role_of(request: web.Request) -> Role | tuple[Role, ...] | None:
    """The role a route-map request needs, or the roles any of which will do (None: open)."""
    path = request.path
    if path in OPEN_PATHS:
        return None
    if path.startswith(RELAY_PREFIX):  # relayed to a server, which checks the credential itself too
        tail = "/" + path[len(RELAY_PREFIX):].partition("/")[2]
        return None if tail in OPEN_PATHS else "use"
    if path in (ATTACH_PATH, ACCEPT_PATH):
        return "join"
    if request.method == "DELETE" and path.startswith("/v1/adapters/"):
        return ("use", "admin")  # its publisher, or an admin
    if path.startswith("/v1/admin/"):
        return "admin"
    if path == "/v1/servers" or path.startswith("/v1/servers/"):
        return "join"
    return "use"


class _Ban(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_id: str = Field(pattern=_ID)


class _Revocation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credential_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class AdminRoutes:
    """Bans and revocations; `remove(server_id)` takes a banned server out of the map, `changed()` republishes."""

    def __init__(self, identities: IdentityBook, verifier: Verifier, remove: Callable[[str], bool],
                 changed: Callable[[], None]) -> None:
        self.identities = identities
        self.verifier = verifier
        self.remove = remove
        self.changed = changed

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/admin/bans", self.ban)
        app.router.add_post("/v1/admin/revocations", self.revoke)

    async def ban(self, request: web.Request) -> web.Response:
        body = await _read(request, _Ban)
        if isinstance(body, web.Response):
            return body
        self.identities.banned.add(body.server_id)
        removed = self.remove(body.server_id)
        self.changed()
        return web.json_response({"banned": body.server_id, "removed": removed})

    async def revoke(self, request: web.Request) -> web.Response:
        body = await _read(request, _Revocation)
        if isinstance(body, web.Response):
            return body
        if body.credential_id not in self.verifier.revoked and len(self.verifier.revoked) >= MAX_REVOKED:
            return web.json_response({"error": f"{MAX_REVOKED} credentials are revoked already: rotate the "
                                               "authority key"}, status=409)
        self.verifier.revoked.add(body.credential_id)
        self.changed()
        return web.json_response({"revoked": body.credential_id})


async def _read(request: web.Request, schema: type[T]) -> T | web.Response:
    if request.content_type != "application/json":
        return web.json_response({"error": "send application/json"}, status=415)
    try:
        return schema.model_validate_json(await request.read())
    except ValidationError as error:
        first = error.errors()[0]
        return web.json_response({"error": f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}"},
                                 status=400)

