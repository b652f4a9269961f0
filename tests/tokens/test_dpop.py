"""DPoP proofs (RFC 9449): published vectors, then each check failing on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis.clock import FrozenClock
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, jwk_thumbprint
from aegis.errors import AegisError, ReplayDetected, TokenError
from aegis.gateway.auth import read_credentials
from aegis.gateway.context import CallContext, Route
from aegis.stores.memory import MemoryReplayStore
from aegis.tokens.dpop import (
    DpopVerifier,
    NonceSource,
    access_token_hash,
    normalize_htu,
)
from tests.gateway.helpers import P256Key, jkt_of, mint_proof

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "rfc9449.json").read_text())
NOW = 1_800_000_000.0
URL = "https://gw.example.com/tools/pay"
TOKEN = "header.payload.signature"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
def verifier(clock: FrozenClock) -> DpopVerifier:
    return DpopVerifier(MemoryReplayStore(clock), clock=clock)


def test_rfc9449_ath_example() -> None:
    assert access_token_hash(VECTORS["access_token"]) == VECTORS["ath"]


def test_rfc9449_jkt_example() -> None:
    assert jwk_thumbprint(VECTORS["proof_jwk"]) == VECTORS["proof_key_jkt"]


@pytest.mark.parametrize("name", ["token_request_proof", "resource_proof"])
def test_rfc9449_example_proofs_verify(name: str) -> None:
    vec = VECTORS[name]
    clock = FrozenClock(vec["iat"] + 30)
    verifier = DpopVerifier(MemoryReplayStore(clock), clock=clock)
    token = VECTORS["access_token"] if name == "resource_proof" else None
    jkt = VECTORS["proof_key_jkt"] if token else None
    got = verifier.verify(
        vec["proof"], method=vec["method"], url=vec["url"], access_token=token, jkt=jkt
    )
    assert (got.jkt, got.jti, got.iat) == (VECTORS["proof_key_jkt"], vec["jti"], vec["iat"])
    clock.advance(31)  # 61 s after iat: outside the default window
    with pytest.raises(TokenError, match="iat is too old"):
        verifier.verify(
            vec["proof"], method=vec["method"], url=vec["url"], access_token=token, jkt=jkt
        )
    if token is not None:
        with pytest.raises(TokenError, match="ath"):
            DpopVerifier(MemoryReplayStore(clock), clock=FrozenClock(vec["iat"])).verify(
                vec["proof"], method="GET", url=vec["url"], access_token=token + "x", jkt=jkt
            )


@pytest.mark.parametrize("key", [Ed25519SigningKey.generate(), P256Key()], ids=["eddsa", "es256"])
def test_valid_proof_with_token(verifier: DpopVerifier, key: Any) -> None:
    proof = mint_proof(key, "POST", URL, token=TOKEN, iat=NOW)
    got = verifier.verify(proof, method="post", url=URL, access_token=TOKEN, jkt=jkt_of(key))
    assert got.jkt == jkt_of(key)
    assert got.expires_at > NOW + 60


def _refused(
    verifier: DpopVerifier, proof: str, code: str = "invalid_dpop_proof", **kw: Any
) -> None:
    args: dict[str, Any] = {"method": "POST", "url": URL, "access_token": TOKEN}
    args.update(kw)
    with pytest.raises(TokenError) as info:
        verifier.verify(proof, **args)
    assert info.value.code == code
    assert TOKEN not in info.value.message


KEY = Ed25519SigningKey.generate()


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("typ", {"header": {"typ": "jwt"}}),
        ("typ prefixed", {"header": {"typ": "application/dpop+jwt"}}),
        ("alg none", {"header": {"alg": "none"}}),
        ("alg HS256", {"header": {"alg": "HS256"}}),
        ("alg RS256", {"header": {"alg": "RS256"}}),
        ("alg ES256 on an Ed25519 key", {"header": {"alg": "ES256"}}),
        ("no jwk", {"drop": ("jwk",)}),
        ("private jwk", {"header": {"jwk": KEY.private_jwk()}}),
        ("jku", {"header": {"jku": "https://evil.example/jwks"}}),
        ("x5c", {"header": {"x5c": ["MIIB"]}}),
        ("other key in jwk", {"header": {"jwk": Ed25519SigningKey.generate().public.to_jwk()}}),
        ("no jti", {"drop": ("jti",)}),
        ("empty jti", {"jti": ""}),
        ("no htm", {"drop": ("htm",)}),
        ("no htu", {"drop": ("htu",)}),
        ("no iat", {"drop": ("iat",)}),
        ("iat string", {"iat": "1800000000"}),
        ("htm", {"htm": "GET"}),
        ("htm lowercase", {"htm": "post"}),
        ("htu other path", {"htu": "https://gw.example.com/tools/refund"}),
        ("htu path case", {"htu": "https://gw.example.com/Tools/pay"}),
        ("htu trailing slash", {"htu": "https://gw.example.com/tools/pay/"}),
        ("htu encoded slash", {"htu": "https://gw.example.com/tools%2Fpay"}),
        ("htu other host", {"htu": "https://evil.example.com/tools/pay"}),
        ("htu http", {"htu": "http://gw.example.com/tools/pay"}),
        ("htu port", {"htu": "https://gw.example.com:8443/tools/pay"}),
        ("htu userinfo", {"htu": "https://u@gw.example.com/tools/pay"}),
        ("htu relative", {"htu": "/tools/pay"}),
        ("no ath", {"drop": ("ath",)}),
        ("ath of another token", {"ath": access_token_hash("other.token.value")}),
    ],
)
def test_each_check_fails_alone(verifier: DpopVerifier, name: str, kw: dict[str, Any]) -> None:
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, **{"iat": NOW, **kw})
    _refused(verifier, proof, jkt=jkt_of(KEY))


def test_remembered_key_does_not_let_a_private_or_altered_jwk_through(
    verifier: DpopVerifier,
) -> None:
    good = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW)
    verifier.verify(good, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))
    private = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"jwk": KEY.private_jwk()})
    _refused(verifier, private, jkt=jkt_of(KEY))
    enc = {**KEY.public.to_jwk(), "use": "enc"}
    _refused(verifier, mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"jwk": enc}),
             jkt=jkt_of(KEY))  # fmt: skip
    verifier.verify(good, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))


def test_signature_tampered(verifier: DpopVerifier) -> None:
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW)
    head, _, sig = proof.split(".")
    other = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW + 1)
    _refused(verifier, f"{head}.{other.split('.')[1]}.{sig}", jkt=jkt_of(KEY))


def test_not_a_jwt(verifier: DpopVerifier) -> None:
    _refused(verifier, "not-a-jwt", jkt=jkt_of(KEY))
    _refused(verifier, "a" * 5000, jkt=jkt_of(KEY))


def test_token_bound_to_another_key(verifier: DpopVerifier) -> None:
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW)
    _refused(verifier, proof, jkt=jkt_of(Ed25519SigningKey.generate()))
    _refused(verifier, proof, jkt=None)


@pytest.mark.parametrize(
    ("offset", "ok"), [(-60, True), (-61, False), (0, True), (5, True), (6, False)]
)
def test_iat_window_boundaries(verifier: DpopVerifier, offset: int, ok: bool) -> None:
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW + offset)
    if ok:
        verifier.verify(proof, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))
    else:
        _refused(verifier, proof, jkt=jkt_of(KEY))


@pytest.mark.parametrize(
    "presented",
    [
        "HTTPS://GW.EXAMPLE.COM/tools/pay",
        "https://gw.example.com:443/tools/pay",
        "https://gw.example.com/tools/pay?x=1",
        "https://gw.example.com/tools/pay#frag",
        "https://gw.example.com/tools/%70ay",
    ],
)
def test_htu_normalised_variants_match(verifier: DpopVerifier, presented: str) -> None:
    proof = mint_proof(KEY, "POST", presented, token=TOKEN, iat=NOW)
    verifier.verify(proof, method="POST", url=URL + "?a=b", access_token=TOKEN, jkt=jkt_of(KEY))


def test_normalize_htu() -> None:
    assert normalize_htu("HTTP://Example.COM:80") == "http://example.com/"
    assert normalize_htu("https://[::1]:8443/a%2fb") == "https://[::1]:8443/a%2Fb"
    for bad in ("ftp://x/", "https:///p", "//x/y", "https://x:99999/"):
        with pytest.raises(ValueError, match=r"uri|[Pp]ort"):
            normalize_htu(bad)


async def test_replay_and_failed_proof_does_not_spend_jti(
    verifier: DpopVerifier, clock: FrozenClock
) -> None:
    bad = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, jti="j1", htm="GET")
    _refused(verifier, bad, jkt=jkt_of(KEY))
    good = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, jti="j1")
    proof = verifier.verify(good, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))
    await verifier.consume(proof)
    with pytest.raises(ReplayDetected) as info:
        await verifier.consume(proof)
    assert info.value.code == "replay_detected"


def test_nonces(clock: FrozenClock) -> None:
    nonces = NonceSource(b"k" * 32, clock, lifetime=300)
    v = DpopVerifier(MemoryReplayStore(clock), clock=clock, nonces=nonces)
    _refused(
        v, mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW), "use_dpop_nonce", jkt=jkt_of(KEY)
    )
    nonce = nonces.issue()
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, nonce=nonce)
    v.verify(proof, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))
    # Another replica with the same key accepts it; a different key does not.
    NonceSource(b"k" * 32, clock).check(nonce)
    with pytest.raises(TokenError):
        NonceSource(b"z" * 32, clock).check(nonce)
    clock.advance(600)
    with pytest.raises(TokenError) as info:
        nonces.check(nonce)
    assert info.value.code == "use_dpop_nonce"
    for junk in (None, 3, "", "!!", "AAAA"):
        with pytest.raises(TokenError):
            nonces.check(junk)


def test_a_replica_whose_clock_lags_accepts_a_nonce_from_the_next_window() -> None:
    """Issued just after a window began by one replica, a nonce is from the future to another
    whose clock is a little behind: accepted within the skew, refused beyond it."""
    boundary = 1_800_000_000.0 - 1_800_000_000.0 % 300
    ahead, behind = FrozenClock(boundary + 0.1), FrozenClock(boundary - 0.2)
    nonce = NonceSource(b"k" * 32, ahead, lifetime=300).issue()
    NonceSource(b"k" * 32, behind, lifetime=300, skew=5).check(nonce)
    far_behind = FrozenClock(boundary - 6)
    with pytest.raises(TokenError):
        NonceSource(b"k" * 32, far_behind, lifetime=300, skew=5).check(nonce)
    # A skew longer than the nonce lifetime spans more than one window.
    issued = NonceSource(b"k" * 32, FrozenClock(1000.5), lifetime=10, skew=15).issue()
    NonceSource(b"k" * 32, FrozenClock(999.5), lifetime=10, skew=15).check(issued)
    NonceSource(b"k" * 32, FrozenClock(988.0), lifetime=10, skew=15).check(issued)


def test_hand_built_proof_with_duplicate_member_is_refused(verifier: DpopVerifier) -> None:
    head = encode_segment({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": KEY.public.to_jwk()})
    proof = sign_compact(head, {"jti": "x", "htm": "POST", "htu": URL, "iat": NOW}, KEY.sign)
    verifier.verify(proof, method="POST", url=URL)  # no token: ath and jkt are not required
    with pytest.raises(AegisError):
        verifier.verify(proof.replace(head, head + "e30"), method="POST", url=URL)


_seg = st.text(alphabet="abcXYZ019-._~%2F", min_size=0, max_size=8)


@given(
    scheme=st.sampled_from(["http", "HTTP", "https", "HtTpS"]),
    host=st.sampled_from(["gw.example.com", "GW.Example.COM", "127.0.0.1", "[::1]"]),
    port=st.sampled_from(["", ":80", ":443", ":8443"]),
    path=st.lists(_seg, max_size=4),
)
def test_normalize_htu_is_idempotent_and_case_blind(
    scheme: str, host: str, port: str, path: list[str]
) -> None:
    url = f"{scheme}://{host}{port}/" + "/".join(path)
    try:
        once = normalize_htu(url)
    except ValueError:
        return  # e.g. a stray '%' is not a URI; it can only ever fail to match
    assert normalize_htu(once) == once
    assert normalize_htu(url.replace(host, host.swapcase())) == once
    assert normalize_htu(url + "?q=1#f") == once


def _ctx(headers: list[tuple[str, str]]) -> CallContext:
    route = Route("/", "http://127.0.0.1:9", "t", "a", "p")
    return CallContext(
        method="POST", url=URL, host="gw", path="/", route=route, headers=tuple(headers)
    )


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "DPoP a.b.c"), ("dpop", "p.q.r"), ("dpop", "p.q.r")],
        [("authorization", "DPoP a.b.c"), ("authorization", "DPoP a.b.c"), ("dpop", "p.q.r")],
        [("authorization", "Bearer a.b.c, DPoP a.b.c"), ("dpop", "p.q.r")],
        [("authorization", "DPoP a.b.c Bearer a.b.c"), ("dpop", "p.q.r")],
        [("authorization", "Bearer a.b.c"), ("dpop", "p.q.r")],
    ],
    ids=[
        "two-dpop-headers",
        "two-authorization",
        "two-schemes-comma",
        "two-schemes-space",
        "bearer-with-proof",
    ],
)
def test_ambiguous_credentials_are_invalid_request(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(AegisError) as info:
        read_credentials(_ctx(headers))
    assert info.value.code == "invalid_request"


def test_scheme_is_case_insensitive_and_dpop_needs_a_proof() -> None:
    creds = read_credentials(_ctx([("authorization", "dpop a.b.c"), ("dpop", "p.q.r")]))
    assert (creds.scheme, creds.token, creds.proof) == ("dpop", "a.b.c", "p.q.r")
    with pytest.raises(TokenError) as info:
        read_credentials(_ctx([("authorization", "DPoP a.b.c")]))
    assert info.value.code == "invalid_dpop_proof"
