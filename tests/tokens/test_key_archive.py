"""A signing key past its retirement overlap leaves the token JWKS and verifies no token, yet its
public half stays on record (the SQL key store, across a restart) so that the attestations and
audit checkpoints it signed can still be checked with ``evidence_jwks``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aegis.audit.checkpoint import jwks_resolver, sign_checkpoint, verify_checkpoint
from aegis.audit.tree import TreeHead
from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.errors import TokenError
from aegis.server.services import Services, build_services
from aegis.types import KeyState
from tests.support.server import run_server, write_dev_config

START = 1_800_000_000.0
ISSUER = "http://127.0.0.1:8080"


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    built = build_services(config, clock=FrozenClock(START))
    yield built
    asyncio.run(built.aclose())


def _token(s: Services) -> str:
    return s.issuer.issue(
        agent_id="a", client_id="c", tenant="acme", env="prod", scopes=("x",),
        audience=("aegis-gateway",), lifetime=60,
    ).token  # fmt: skip


def test_a_key_past_its_overlap_is_archived_not_forgotten(
    services: Services, tmp_path: Path
) -> None:
    ring, clock = services.keyring, services.clock
    assert isinstance(clock, FrozenClock)
    old = ring.signing_key()
    head = TreeHead(size=1, root=bytes(32), chain_hash="ab" * 32)
    checkpoint = sign_checkpoint(ring, issuer=ISSUER, head=head, now=clock.now())
    token = _token(services)
    ring.rotate(force=True)
    clock.advance(ring.settings.max_token_lifetime + ring.settings.leeway + 1)
    ring.rotate(force=True)  # this rotation finds the old key past its overlap

    (record,) = [r for r in ring.records() if r.kid == old.kid]
    assert (record.state, record.private_blob) == (KeyState.ARCHIVED, None)
    assert old.kid not in {k["kid"] for k in ring.jwks()["keys"]}
    assert ring.public_key(old.kid) is None
    with pytest.raises(TokenError):
        services.verifier.verify(token)
    # What it signed can still be checked, from the evidence set alone.
    evidence = ring.evidence_jwks()
    assert {k["kid"] for k in ring.jwks()["keys"]} < {k["kid"] for k in evidence["keys"]}
    assert all(set(k) == {"kty", "crv", "x", "kid", "use", "alg"} for k in evidence["keys"])
    assert verify_checkpoint(checkpoint, jwks_resolver(evidence)).kid == old.kid

    # A restart reads the archive back; the key still verifies nothing, and rotating again
    # keeps it.
    again = build_services(load_config(tmp_path / "aegis.yaml", environ={}), clock=clock)
    try:
        assert again.keyring.public_key(old.kid) is None
        with pytest.raises(TokenError):
            again.verifier.verify(token)
        clock.advance(again.keyring.settings.publish_lead + 1)
        again.keyring.rotate()
        assert old.kid in {k["kid"] for k in again.keyring.evidence_jwks()["keys"]}
    finally:
        asyncio.run(again.aclose())


def test_the_evidence_set_is_served_beside_the_token_jwks(tmp_path: Path) -> None:
    with run_server(tmp_path) as srv:
        tokens = httpx.get(f"{srv.url}/.well-known/jwks.json").json()
        evidence = httpx.get(f"{srv.url}/.well-known/aegis-evidence-jwks.json").json()
    assert evidence == srv.services.keyring.evidence_jwks()
    assert {k["kid"] for k in tokens["keys"]} <= {k["kid"] for k in evidence["keys"]}
