"""The route-map service's adapter API over an :class:`~llmswarm_control.adapters.AdapterStore`.

  POST /v1/adapters/{name}                  publish (a safetensors file, application/octet-stream); ``?replace=1``
                                            replaces one's own; headers X-Llmswarm-Publisher (who, shown in the list)
                                            and X-Llmswarm-Publisher-Key (a secret that proves it is the same publisher).
                                            With a credential of the swarm's authority (credentials.py) the publisher
                                            is the credential's holder and needs no key: the publication is signed by
                                            the credential, and only that holder or an admin replaces or deletes it
  DELETE /v1/adapters/{name}                the publisher (its key or credential) or an admin removes it
  GET  /v1/adapters                         ``{"adapters": [{name, publisher, size, base_model, target_modules, ...}]}``
  GET  /v1/adapters/{name}                  one adapter's entry
  GET  /v1/adapters/{name}/blocks/{a}-{b}   a span's weights as a wire frame (llmswarm_core.lora.PublishedBlocks);
                                            ETag: the file's SHA-256 (If-None-Match answers 304)

Refusals are ``{"error": message}`` with their status (400 malformed, 403 not the publisher, 404 unknown,
409 exists or another base model, 413 too large, 415 not application/octet-stream).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from aiohttp import web

from llmswarm_control.adapters import AdapterRefused, AdapterStore
from llmswarm_core.routemap import ModelInfo
from llmswarm_core.routemap_client import read_limited
from llmswarm_core.security import PRINCIPAL

PUBLISHER_HEADER = "X-Llmswarm-Publisher"
KEY_HEADER = "X-Llmswarm-Publisher-Key"
_PUBLISHER = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
SHARED = "swarm-token"  # the credential id of the shared token (credentials.Verifier)
_SPAN = re.compile(r"^(\d{1,9})-(\d{1,9})$")


def _publisher(request: web.Request) -> tuple[str, str, bool]:
    """Who publishes (shown in the list), the key that proves it is the same publisher later, and whether an admin
    asks. A credential of the swarm's authority names its holder (the key is derived from that name, which only the
    authority can sign); the shared token or an open swarm use the headers."""
    principal = request.get(PRINCIPAL)
    if principal is not None and principal.credential_id != SHARED:
        return principal.name[:64], f"credential:{principal.name}", principal.can("admin")
    publisher = request.headers.get(PUBLISHER_HEADER, "anonymous")
    if not _PUBLISHER.match(publisher):
        raise AdapterRefused(400, f"bad {PUBLISHER_HEADER}: 1-64 letters, digits or _.@+-")
    key = request.headers.get(KEY_HEADER, "")
    if key and not 16 <= len(key) <= 256:
        raise AdapterRefused(400, f"{KEY_HEADER} must have 16 to 256 characters")
    return publisher, key, False  # the shared token is everyone's in a swarm of one credential: no admin here


class AdapterRoutes:
    def __init__(self, store: AdapterStore, model: Callable[[], ModelInfo | None]) -> None:
        self.store = store
        self.model = model  # the swarm's model as the route map knows it now (None: no server announced yet)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/adapters", self.listing)
        app.router.add_post("/v1/adapters/{name}", self.publish)
        app.router.add_delete("/v1/adapters/{name}", self.delete)
        app.router.add_get("/v1/adapters/{name}", self.describe)
        app.router.add_get("/v1/adapters/{name}/blocks/{span}", self.blocks)

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response({"adapters": self.store.listing()})

    async def describe(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.store.get(request.match_info["name"]).summary())
        except AdapterRefused as refusal:
            return _refused(refusal)

    async def publish(self, request: web.Request) -> web.Response:
        try:
            # Only application/octet-stream: a web page can POST a form or text/plain anywhere without a preflight.
            if request.content_type != "application/octet-stream":
                raise AdapterRefused(415, f"publish a safetensors file as application/octet-stream, not {request.content_type!r}")
            publisher, key, admin = _publisher(request)
            data = await self._body(request)
            model = self.model()
            stored = await asyncio.to_thread(
                self.store.publish, request.match_info["name"], data, publisher, key,
                request.query.get("replace", "") in ("1", "true"), None if model is None else model.name,
                None if model is None else model.num_blocks, admin)
        except AdapterRefused as refusal:
            return _refused(refusal)
        return web.json_response(stored.summary(), status=201)

    async def delete(self, request: web.Request) -> web.Response:
        try:
            _, key, admin = _publisher(request)
            stored = self.store.delete(request.match_info["name"], key, admin)
        except AdapterRefused as refusal:
            return _refused(refusal)
        return web.json_response({"deleted": stored.name})

    async def _body(self, request: web.Request) -> bytes:
        """The request body, read up to the store's size limit (the app's own limit is for small JSON)."""
        limit = self.store.limits.max_adapter_bytes
        if request.content_length is not None and request.content_length > limit:
            raise AdapterRefused(413, f"the adapter has {request.content_length} bytes, the limit is {limit}")
        body = await read_limited(request.content, limit)
        if body is None:
            raise AdapterRefused(413, f"the adapter has more than {limit} bytes, the limit")
        return body

    async def blocks(self, request: web.Request) -> web.Response:
        try:
            span = _SPAN.match(request.match_info["span"])
            if span is None:
                raise AdapterRefused(400, "blocks are START-END")
            stored = self.store.get(request.match_info["name"])
            etag = f'"{stored.publication.digest}"'
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            body = self.store.blocks(stored, int(span.group(1)), int(span.group(2)))
        except AdapterRefused as refusal:
            return _refused(refusal)
        return web.Response(body=body, content_type="application/octet-stream", headers={"ETag": etag})


def _refused(refusal: AdapterRefused) -> web.Response:
    return web.json_response({"error": str(refusal)}, status=refusal.status)
