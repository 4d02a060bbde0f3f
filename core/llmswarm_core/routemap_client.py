"""Talking to a route-map service: read the map, announce a server, leave it.

One client for every part: the Python client reads routes with :func:`fetch_routes`
(blocking, ``requests``); block servers and the local substrate use :class:`RouteMapClient`
(asyncio, ``aiohttp``) for heartbeats, drain and the push peers' directory. Every call has
a timeout: a hung route map costs a caller at most that long.
"""

from __future__ import annotations

import time
from types import TracebackType

import aiohttp
import requests

from llmswarm_core.identity import IdentityError, ServerIdentity, verify
from llmswarm_core.routemap import Announcement, RouteMap
from llmswarm_core.security import client_ssl_context


class RouteMapError(RuntimeError):
    """The route map could not be read, or refused what was sent to it."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


LEAVE_HEADER = "X-Llmswarm-Leave"
LEAVE_WINDOW = 300.0  # seconds a signed leave stays valid (clocks of servers and route map may differ by this much)


def leave_header(identity: ServerIdentity, server_id: str, now: float) -> str:
    """``<unix time>.<signature of {"leave": id, "at": time}>``: only the server's key can take it off the map."""
    at = int(now)
    return f"{at}.{identity.sign({'leave': server_id, 'at': at})}"


def check_leave(header: str, server_id: str, public_key: str, now: float) -> None:
    """Raise IdentityError unless `header` is `server_id`'s signed leave from the last LEAVE_WINDOW seconds."""
    at_text, _, signature = header.partition(".")
    if not at_text.isdecimal() or len(at_text) > 12 or abs(now - int(at_text)) > LEAVE_WINDOW:
        raise IdentityError("no signed leave of the last minutes")
    verify(public_key, {"leave": server_id, "at": int(at_text)}, signature)


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """A body read to its end, or None as soon as it has more than `limit` bytes."""
    chunks, total = [], 0
    async for chunk in stream.iter_chunked(1 << 20):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_routes(http: requests.Session, url: str, timeout: float, verify: str | bool = True) -> RouteMap:
    """``GET {url}/v1/routes``, checked against the schema; raises RouteMapError (status 401 for a refused token)."""
    try:
        response = http.get(f"{url.rstrip('/')}/v1/routes", timeout=timeout, verify=verify)
    except requests.RequestException as error:
        raise RouteMapError(f"cannot read the route map at {url}: {error}") from error
    if response.status_code == 401:
        raise RouteMapError(f"the route map at {url} refused the swarm token", 401)
    if response.status_code >= 400:
        raise RouteMapError(f"cannot read the route map at {url}: HTTP {response.status_code}", response.status_code)
    try:
        return RouteMap.model_validate_json(response.content)
    except ValueError as error:
        raise RouteMapError(f"the route map at {url} sent a malformed map: {error}") from None


class RouteMapClient:
    """An asyncio client of one route-map service, with a timeout on every call.

    Use it as ``async with RouteMapClient(url, token, tls_ca) as routes: ...``.
    """

    def __init__(self, url: str, token: str | None = None, tls_ca: str | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(tls_ca)) if self.url.startswith("https://") else None
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector,
                                           headers=auth_headers(token) or None)

    async def __aenter__(self) -> RouteMapClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    async def routes(self) -> RouteMap:
        try:
            async with self._http.get(f"{self.url}/v1/routes") as response:
                if response.status >= 400:
                    raise RouteMapError(f"cannot read the route map at {self.url}: HTTP {response.status}", response.status)
                return RouteMap.model_validate_json(await response.read())
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise RouteMapError(f"cannot read the route map at {self.url}: {error}") from error
        except ValueError as error:
            raise RouteMapError(f"the route map at {self.url} sent a malformed map: {error}") from None

    async def announce(self, announcement: Announcement) -> None:
        """``POST /v1/servers``: raises RouteMapError when it is refused or cannot be sent."""
        try:
            async with self._http.post(f"{self.url}/v1/servers", json=announcement.model_dump()) as response:
                if response.status >= 400:
                    raise RouteMapError(f"the route map refused the announcement: {response.status} {await response.text()}",
                                        response.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise RouteMapError(f"cannot reach the route map at {self.url}: {error}") from error

    async def adapter_blocks(self, name: str, start: int, end: int, max_bytes: int,
                             etag: str | None = None) -> tuple[bytes | None, str | None]:
        """``GET /v1/adapters/{name}/blocks/{start}-{end}``: (the wire frame, its ETag), or (None, etag) when it is
        unchanged since `etag`; RouteMapError otherwise (status 404: no such adapter is published; 413: more than
        `max_bytes`)."""
        headers = {"If-None-Match": etag} if etag else None
        try:
            async with self._http.get(f"{self.url}/v1/adapters/{name}/blocks/{start}-{end}", headers=headers) as response:
                if response.status == 304:
                    return None, etag
                if response.status >= 400:
                    raise RouteMapError(f"the route map answered {response.status}: {(await response.text())[:500]}",
                                        response.status)
                body = await read_limited(response.content, max_bytes)
                if body is None:
                    raise RouteMapError(f"adapter {name!r} has more than {max_bytes} bytes for blocks [{start}, {end})",
                                        413)
                return body, response.headers.get("ETag")
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise RouteMapError(f"cannot reach the route map at {self.url}: {error}") from error

    async def leave(self, server_id: str, identity: ServerIdentity | None = None) -> None:
        """``DELETE /v1/servers/{id}``, signed with the server's key when it has one; errors are RouteMapErrors."""
        headers = {LEAVE_HEADER: leave_header(identity, server_id, time.time())} if identity is not None else None
        try:
            async with self._http.delete(f"{self.url}/v1/servers/{server_id}", headers=headers):
                pass
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            raise RouteMapError(f"cannot reach the route map at {self.url}: {error}") from error
