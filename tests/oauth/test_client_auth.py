"""Client authentication at the token endpoint over real HTTP: ES256 assertions from a third-party
client, the assertion audience rule, and the failed-authentication limit per client and per source
address (each source is its own loopback address, so the server sees distinct peers)."""

from __future__ import annotations

import hashlib
import hmac
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, b64u_encode, public_key_from_jwk
from aegis.registry.service import AgentSpec
from aegis.types import ClientAuthMethod
from tests.oauth.test_token_endpoint import _verify_with_joserfc
from tests.support.server import RunningServer, run_server

ADMIN = "test-admin"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LIMIT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(
        tmp_path_factory.mktemp("client-auth"), f"oauth:\n  auth_failure_limit: {LIMIT}\n"
    ) as srv:
        yield srv


_next_address = iter(range(2, 250))


def _source() -> str:
    """A loopback address no other test in this module has used (so its failure count is 0)."""
    return f"127.0.0.{next(_next_address)}"


def _post(srv: RunningServer, source: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as http:
        return http.post(f"{srv.url}/oauth/token", **kwargs)


def _agent(srv: RunningServer, jwks: tuple[dict[str, Any], ...] = ()) -> str:
    agent_id = f"agent-{new_id(4).lower().replace('_', 'x')}"
    srv.services.registry.register_agent(
        AgentSpec(agent_id, "acme", "prod", "a@example.com", allowed_scopes=("x:y",), jwks=jwks),
        actor=ADMIN,
    )
    return agent_id


def _secret_client(srv: RunningServer) -> tuple[str, str]:
    client, secret = srv.services.registry.create_client(_agent(srv), actor=ADMIN)
    assert secret is not None
    return client.client_id, secret


def _grant(srv: RunningServer, source: str, client_id: str, secret: str) -> int:
    return _post(
        srv, source, data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    ).status_code


def _p256() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    nums = private.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64u_encode(nums.x.to_bytes(32, "big")),
        "y": b64u_encode(nums.y.to_bytes(32, "big")),
    }
    return private, jwk


def _assertion(
    sign: Any, alg: str, client_id: str, aud: Any, kid: str | None = None, **over: Any
) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 60, "iat": now}
    claims["jti"] = new_id()
    claims.update(over)
    header = {"alg": alg, "typ": "JWT"} | ({"kid": kid} if kid else {})
    return sign_compact(encode_segment(header), claims, sign)


def _with_assertion(assertion: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }


# -- private_key_jwt: ES256 and the audience ------------------------------------------------


def test_private_key_jwt_es256_with_authlib(server: RunningServer) -> None:
    private, jwk = _p256()
    agent_id = _agent(server, jwks=(jwk,))
    client, _ = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    token_url = f"{server.url}/oauth/token"
    signer = ECKey.import_key(private)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with OAuth2Client(
            client.client_id,
            signer,
            # authlib's audience is its first argument: the issuer (rfc7523bis).
            token_endpoint_auth_method=PrivateKeyJWT(
                server.url, alg="ES256", claims={"exp": int(time.time()) + 60}
            ),
        ) as oc:
            token = oc.fetch_token(token_url, grant_type="client_credentials")
    claims = _verify_with_joserfc(server, token["access_token"])
    assert claims["sub"] == agent_id and claims["client_id"] == client.client_id


def _es256_signer(private: ec.EllipticCurvePrivateKey) -> Any:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def _key_client(srv: RunningServer, agent_id: str) -> str:
    """A new private_key_jwt client of ``agent_id``: each refusal below has its own failure count."""
    client, _ = srv.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    return client.client_id


def test_assertion_audience_is_the_issuer_alone(server: RunningServer) -> None:
    """draft-ietf-oauth-rfc7523bis: the issuer identifier as a string and nothing else. The
    token endpoint (a hostile authorization server can claim it in its own metadata, and have a
    client sign assertions for it), a list, or the issuer among other audiences could have been
    made for another party."""
    key = Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(key.public.to_jwk(),))
    cid, src = _key_client(server, agent_id), _source()
    resp = _post(server, src, data=_with_assertion(_assertion(key.sign, "EdDSA", cid, server.url)))
    assert resp.status_code == 200, resp.text
    endpoint, other = f"{server.url}/oauth/token", "https://other.example"
    wrong: list[Any] = [f"{server.url}/", f"{server.url}/oauth", ["https://other.example"], 7,
                        endpoint, [server.url], [endpoint, other], [server.url, other],
                        [server.url, server.url]]  # fmt: skip
    for aud in wrong:
        assertion = _assertion(key.sign, "EdDSA", _key_client(server, agent_id), aud)
        resp = _post(server, _source(), data=_with_assertion(assertion))
        assert resp.status_code == 401, aud
        assert resp.json()["error"] == "invalid_client"


def test_assertion_algorithms_outside_the_allowlist_are_refused(server: RunningServer) -> None:
    private, jwk = _p256()
    key = Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(jwk, key.public.to_jwk()))
    url = server.url  # the assertions' audience: the issuer
    es256, ec_kid = _es256_signer(private), public_key_from_jwk(jwk).kid
    good = _assertion(es256, "ES256", _key_client(server, agent_id), url, ec_kid)
    assert _post(server, _source(), data=_with_assertion(good)).status_code == 200

    def hs256(m: bytes) -> bytes:
        return hmac.new(jwk["x"].encode(), m, hashlib.sha256).digest()

    refused = {
        "ES384 label": (es256, "ES384", ec_kid),
        "HS256 keyed with the public x": (hs256, "HS256", ec_kid),
        "none": (lambda m: b"", "none", ec_kid),
        "RS256 label on an Ed25519 signature": (key.sign, "RS256", key.kid),
        "EdDSA label on the P-256 key": (key.sign, "EdDSA", ec_kid),
    }
    for name, (sign, alg, kid) in refused.items():
        assertion = _assertion(sign, alg, _key_client(server, agent_id), url, kid)
        resp = _post(server, _source(), data=_with_assertion(assertion))
        assert resp.status_code == 401, name
        assert resp.json()["error"] == "invalid_client", name


# -- failed client authentication is limited per client and per source address ---------------


def test_limit_per_source_address_across_clients(server: RunningServer) -> None:
    attacker = _source()
    victims = [_secret_client(server) for _ in range(LIMIT + 1)]
    for client_id, _ in victims[:LIMIT]:
        assert _grant(server, attacker, client_id, "wrong") == 401
    # The address is now limited, even for a client it never failed with and the right secret.
    last_id, last_secret = victims[LIMIT]
    assert _grant(server, attacker, last_id, last_secret) == 429
    # Each client failed only once, so from elsewhere they all still work.
    for client_id, secret in victims:
        assert _grant(server, _source(), client_id, secret) == 200


def test_limit_per_client_across_source_addresses(server: RunningServer) -> None:
    (client_id, secret), (other_id, other_secret) = _secret_client(server), _secret_client(server)
    for _ in range(LIMIT):
        assert _grant(server, _source(), client_id, "wrong") == 401
    fresh = _source()
    limited = _post(
        server, fresh, data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert limited.status_code == 429
    assert limited.json()["error"] == "slow_down"
    assert limited.headers["retry-after"].isdigit()
    assert secret not in limited.text
    # The fresh address itself is not limited: another client authenticates from it.
    assert _grant(server, fresh, other_id, other_secret) == 200


def test_bad_assertions_count_against_the_client_they_name(server: RunningServer) -> None:
    key, stranger = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(key.public.to_jwk(),))
    client, _ = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    cid, url = client.client_id, server.url
    for _ in range(LIMIT):  # signed by a key the client never registered, each from a new peer
        forged = _assertion(stranger.sign, "EdDSA", cid, url)
        assert _post(server, _source(), data=_with_assertion(forged)).status_code == 401
    good = _assertion(key.sign, "EdDSA", cid, url)
    assert _post(server, _source(), data=_with_assertion(good)).status_code == 429


def test_replayed_assertions_count_against_the_client(server: RunningServer) -> None:
    key = Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(key.public.to_jwk(),))
    client, _ = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    cid, url = client.client_id, server.url
    captured = _assertion(key.sign, "EdDSA", cid, url)
    assert _post(server, _source(), data=_with_assertion(captured)).status_code == 200
    for _ in range(LIMIT):
        replay = _post(server, _source(), data=_with_assertion(captured))
        assert replay.status_code == 401 and "replayed" in replay.json()["error_description"]
    fresh = _assertion(key.sign, "EdDSA", cid, url)
    assert _post(server, _source(), data=_with_assertion(fresh)).status_code == 429


def test_the_limit_lifts_once_the_window_has_passed(tmp_path: Path) -> None:
    # The three grants must land inside one window for the third to be refused: 2 s leaves room
    # for a slow, shared machine, where 1 s let the first failure age out before the third call.
    window = 2
    extra = f"oauth:\n  auth_failure_limit: 2\n  auth_failure_window: {window}\n"
    with run_server(tmp_path, extra) as srv:
        client_id, secret = _secret_client(srv)
        src = _source()
        codes = [_grant(srv, src, client_id, "no") for _ in range(2)]
        counted = time.monotonic()  # both failures were recorded before they were answered
        codes.append(_grant(srv, src, client_id, "no"))
        assert codes == [401, 401, 429]
        # One system-wide monotonic clock: once the window has passed since the last failure,
        # the limit must have lifted.
        time.sleep(max(0.0, counted + window + 0.1 - time.monotonic()))
        assert _grant(srv, src, client_id, secret) == 200


def test_a_forged_assertion_learns_nothing_of_the_client_it_names(server: RunningServer) -> None:
    """Before its signature is checked, an assertion for a secret client, a private_key_jwt
    client and an unknown id get one answer: which ids exist, and how each authenticates, is
    not for an unauthenticated caller to learn. The log keeps the reason."""
    key = Ed25519SigningKey.generate()  # no agent registered this key
    secret_client, _ = _secret_client(server)
    jwt_agent = _agent(server, ({**Ed25519SigningKey.generate().public.to_jwk()},))
    jwt_client, _ = server.services.registry.create_client(
        jwt_agent, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    answers = set()
    for client_id in (secret_client, jwt_client.client_id, "agent-nobody.c1"):
        claims = {"iss": client_id, "sub": client_id, "aud": server.url,
                  "exp": int(time.time()) + 60, "jti": new_id()}  # fmt: skip
        forged = sign_compact(encode_segment({"alg": "EdDSA", "kid": key.kid}), claims, key.sign)
        resp = _post(server, _source(), data={"grant_type": "client_credentials",
                     "client_assertion_type": ASSERTION_TYPE, "client_assertion": forged})  # fmt: skip
        assert resp.status_code == 401
        answers.add((resp.json()["error"], resp.json()["error_description"]))
    assert answers == {("invalid_client", "client authentication failed")}
