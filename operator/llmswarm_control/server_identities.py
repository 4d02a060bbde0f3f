"""Which key speaks for which server, and which addresses have proved to be that server. Pure, no I/O.

The route map keeps an :class:`IdentityBook`:

- an id of the form ``srv-...`` belongs to the public key it derives from
  (:func:`llmswarm_core.identity.id_of`); any other id (a name such as ``local-0`` or an
  operator's Deployment name) belongs to the first key that announced it, for the life of
  the route map. An announcement for an id with another key is a hijack and is refused;
- an announcement must be signed by the key it carries (unless signatures are not required,
  for a swarm whose servers predate identities);
- a server is listed ``online`` only once its announced address answered a challenge signed
  with its key (:class:`~llmswarm_core.routemap.IdentityProof`): nobody can list an address
  they do not control. Until then its announcements are listed as ``joining``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmswarm_core.identity import ID_PREFIX, IdentityError, id_of
from llmswarm_core.routemap import Announcement


class IdentityRefused(ValueError):
    """An announcement whose signature or identity does not check out; `reason` is counted in the metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class IdentityBook:
    require_signatures: bool = True
    check_addresses: bool = True
    keys: dict[str, str] = field(default_factory=dict)  # server id -> the public key that speaks for it
    proven: set[tuple[str, str, str]] = field(default_factory=set)  # (id, url, key) whose address answered
    banned: set[str] = field(default_factory=set)  # server ids an admin banned: refused for the map's life

    def admit(self, announcement: Announcement) -> Announcement:
        """The announcement as the map may take it (``online`` held back as ``joining`` until the address is
        proven); raises IdentityRefused for an unsigned one (where signatures are required), a bad
        signature, or an id that another key holds."""
        server_id, key = announcement.server.id, announcement.public_key
        if server_id in self.banned:
            raise IdentityRefused("banned", f"server id {server_id} is banned from this swarm")
        if key is None:
            if self.require_signatures:
                raise IdentityRefused("unsigned", "announcements must be signed by the server's key")
            if server_id in self.keys:
                raise IdentityRefused("hijack", f"server id {server_id} belongs to a key; this announcement has none")
            return announcement
        try:
            announcement.check_signature()
        except IdentityError as error:
            raise IdentityRefused("signature", f"the announcement's signature does not check out: {error}") from None
        self.claim(server_id, key)
        if self.needs_proof(announcement):
            return announcement.model_copy(update={"server": announcement.server.model_copy(update={"state": "joining"})})
        return announcement

    def claim(self, server_id: str, key: str) -> None:
        """`key` speaks for `server_id` from now on (the id's first key, or the key it derives from); raises
        IdentityRefused where the id belongs to another key (a hijack)."""
        if server_id.startswith(ID_PREFIX) and id_of(key) != server_id:
            raise IdentityRefused("hijack", f"server id {server_id} is not the id of the announcing key ({id_of(key)})")
        if self.keys.setdefault(server_id, key) != key:
            raise IdentityRefused("hijack", f"server id {server_id} belongs to another key")

    def needs_proof(self, announcement: Announcement) -> bool:
        """Whether the announcement says ``online`` from an address that has not proven to be this server."""
        server = announcement.server
        if not self.check_addresses or announcement.public_key is None or server.state != "online":
            return False
        return (server.id, server.url, announcement.public_key) not in self.proven

    def proved(self, server_id: str, url: str, key: str) -> None:
        self.proven.add((server_id, url, key))
