"""Server identities (Ed25519 keys, ids from keys, signatures) and role credentials, as pure units."""

from __future__ import annotations

import math
import os
import stat
import time

import pytest

from llmswarm_core.credentials import ROLES, Authority, CredentialError, Verifier, credential_id
from llmswarm_core.identity import IdentityError, ServerIdentity, canonical, id_of, verify


def test_a_key_is_created_once_kept_private_and_gives_a_stable_id(tmp_path):
    path = tmp_path / "keys" / "server.key"
    first = ServerIdentity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = ServerIdentity.load_or_create(path)
    assert again.server_id == first.server_id == id_of(first.public_key)
    assert first.server_id.startswith("srv-") and len(first.server_id) == 24
    assert ServerIdentity.generate().server_id != first.server_id


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path):
    path = tmp_path / "server.key"
    path.write_text("not a key")
    with pytest.raises(IdentityError, match="not a private key"):
        ServerIdentity.load_or_create(path)


def test_signatures_check_out_only_for_the_same_payload_and_key():
    identity, other = ServerIdentity.generate(), ServerIdentity.generate()
    payload = {"server": {"id": identity.server_id, "start": 0, "end": 10}, "ttl": 10.0}
    signature = identity.sign(payload)
    verify(identity.public_key, {"ttl": 10.0, "server": {"end": 10, "start": 0, "id": identity.server_id}}, signature)
    for key, body in ((other.public_key, payload), (identity.public_key, {**payload, "ttl": 11.0})):
        with pytest.raises(IdentityError, match="bad signature"):
            verify(key, body, signature)
    with pytest.raises(IdentityError):
        verify("short", payload, signature)
    with pytest.raises(IdentityError, match="32 bytes"):
        id_of("AAAA")
    with pytest.raises(IdentityError, match="cannot sign"):
        canonical({"throughput": math.inf})


def test_credentials_carry_roles_and_are_checked_against_the_authority():
    authority = Authority(ServerIdentity.generate())
    verifier = Verifier(authority.public_key)
    use = authority.issue("alice", ["use"])
    principal = verifier.principal(f"Bearer {use}")
    assert principal is not None and principal.name == "alice" and principal.can("use") and not principal.can("join")
    admin = verifier.principal(f"Bearer {authority.issue('ops', ROLES)}")
    assert admin is not None and all(admin.can(r) for r in ROLES)
    # Another authority's credential, a tampered one, a malformed one, and no scheme: nothing.
    foreign = Authority(ServerIdentity.generate()).issue("mallory", ROLES)
    prefix, claims, signature = use.split(".")
    tampered = ".".join([prefix, claims[:-2] + ("A" if claims[-2] != "A" else "B") + claims[-1], signature])
    for header in (f"Bearer {foreign}", f"Bearer {tampered}", "Bearer lsw1.x.y", "Bearer lsw1", use, None, ""):
        assert verifier.principal(header) is None, header


def test_revoked_and_expired_credentials_are_refused():
    now = [1000.0]
    authority = Authority(ServerIdentity.generate())
    verifier = Verifier(authority.public_key, clock=lambda: now[0])
    token = authority.issue("bob", ["use", "join"])
    assert verifier.principal(f"Bearer {token}") is not None
    verifier.revoked.add(credential_id(token))
    assert verifier.principal(f"Bearer {token}") is None
    brief = authority.issue("carol", ["use"], ttl_seconds=60)
    now[0] = time.time()
    assert verifier.principal(f"Bearer {brief}") is not None
    now[0] = time.time() + 120
    assert verifier.principal(f"Bearer {brief}") is None


def test_the_shared_token_holds_every_role_and_an_open_swarm_checks_nothing():
    verifier = Verifier(shared_token="s3cret")
    principal = verifier.principal("Bearer s3cret")
    assert principal is not None and principal.roles == frozenset(ROLES)
    assert verifier.principal("Bearer s3cre") is None
    assert not Verifier().enabled and Verifier(shared_token="x").enabled


def test_issuing_checks_roles_and_names():
    authority = Authority(ServerIdentity.generate())
    for name, roles in (("x", ["root"]), ("x", []), ("", ["use"]), ("n" * 200, ["use"])):
        with pytest.raises(CredentialError):
            authority.issue(name, roles)
