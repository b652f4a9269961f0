"""Two control-plane replicas sharing the database and Redis: a token revoked at one is dead at the
other, and a client assertion spent at one is a replay at the other."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from aegis.clock import new_id
from aegis.config import load_config
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import ClientAuthError
from aegis.registry.service import AgentSpec
from aegis.server.services import build_services
from aegis.types import ClientAuthMethod
from tests.support.server import RunningServer, run_server

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def test_revocation_and_assertion_replay_are_shared(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    shared = (
        f"stores:\n  replay: {redis_url}\n  revocation: {redis_url}\n"
        f"  redis_prefix: '{redis_prefix}'\n"
    )
    with run_server(tmp_path, shared) as a:
        asyncio.run(_scenario(a))


async def _scenario(a: RunningServer) -> None:
    # Replica B lives on this event loop (its Redis clients belong to it); A serves over HTTP
    # from its own thread, so blocking calls to A from here are fine.
    b = build_services(load_config(a.config.path("aegis.yaml"), environ={}))
    try:
        key = Ed25519SigningKey.generate()
        a.services.registry.register_agent(
            AgentSpec(
                "shared-agent", "acme", "prod", "a@example.com",
                allowed_scopes=("p:r",), jwks=(key.public.to_jwk(),),
            ),
            actor="test",
        )  # fmt: skip
        secret_client, secret = a.services.registry.create_client("shared-agent", actor="test")
        assert secret is not None
        auth = (secret_client.client_id, secret)
        token = httpx.post(
            f"{a.url}/oauth/token", data={"grant_type": "client_credentials"}, auth=auth
        ).json()["access_token"]
        assert (await b.tokens.introspect(token, tenant="acme"))["active"] is True
        revoked = httpx.post(f"{a.url}/oauth/revoke", data={"token": token}, auth=auth)
        assert revoked.status_code == 200
        # Replica B never saw the revocation request; the shared store tells it.
        assert await b.tokens.introspect(token, tenant="acme") == {"active": False}

        key_client, _ = a.services.registry.create_client(
            "shared-agent", auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        cid, url, now = key_client.client_id, f"{a.url}/oauth/token", int(time.time())
        claims = {"iss": cid, "sub": cid, "aud": a.url, "exp": now + 60, "iat": now}
        claims["jti"] = new_id()
        assertion = sign_compact(encode_segment({"alg": "EdDSA"}), claims, key.sign)
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        assert httpx.post(url, data=form).status_code == 200
        with pytest.raises(ClientAuthError, match="replayed"):
            await b.authenticator.authenticate(form, None, "127.0.0.9")
    finally:
        await b.aclose()
