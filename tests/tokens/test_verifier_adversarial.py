"""Adversarial access tokens against AccessTokenVerifier: each named test asserts the exact code.

Time boundaries (leeway L = 30 s, RFC 7519 §4.1.4/§4.1.5/§4.1.6 with clock skew):

* ``exp``: accepted while ``now < exp + L``; refused from ``now == exp + L`` on (token_expired);
* ``nbf``: accepted while ``nbf <= now + L``; refused from ``nbf == now + L + 1`` (token_not_yet_valid);
* ``iat``: accepted while ``iat <= now + L``; refused from ``iat == now + L + 1``
  (token_issued_in_future).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey as CryptoEdPublic

from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.jws import MAX_TOKEN_BYTES, encode_segment
from aegis.crypto.keyring import KeyRing, KeyRingSettings
from aegis.crypto.keys import Ed25519SigningKey, PublicKey, b64u_decode, b64u_encode
from aegis.errors import TokenError
from aegis.tokens.claims import AccessToken
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import ACCESS_TOKEN_CLAIMS, MAX_KID_LENGTH, AccessTokenVerifier
from tests.crypto.fakes import MemoryKeyStore

ISS = "https://aegis.example"
AUD = "https://payments.example"
T0 = 1_800_000_000
LEEWAY = 30


@dataclass
class Env:
    clock: FrozenClock
    ring: KeyRing
    issuer: TokenIssuer
    verifier: AccessTokenVerifier
    lookups: list[str]

    @property
    def key(self) -> Ed25519SigningKey:
        return self.ring.signing_key()

    def claims(self, **over: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": ISS,
            "sub": "agent-1",
            "aud": AUD,
            "exp": T0 + 300,
            "iat": T0,
            "nbf": T0,
            "jti": "jti-1",
            "client_id": "client-1",
            "scope": "payments:read",
            "tenant": "acme",
            "env": "prod",
            "agent_id": "agent-1",
        }
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not _DROP}

    def header(self, **over: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "at+jwt", "kid": self.key.kid}
        header.update(over)
        return {k: v for k, v in header.items() if v is not _DROP}

    def token(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        *,
        signer: Callable[[bytes], bytes] | None = None,
    ) -> str:
        h = encode_segment(self.header() if header is None else header)
        p = encode_segment(self.claims() if claims is None else claims)
        return raw_token(h, p, signer or self.key.sign)

    def verify(self, token: Any) -> AccessToken:
        return self.verifier.verify(token)

    def refuse(self, token: Any, code: str) -> TokenError:
        with pytest.raises(TokenError) as err:
            self.verifier.verify(token)
        assert err.value.code == code, err.value.message
        return err.value


_DROP = object()


def raw_token(h: str, p: str, sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{h}.{p}"
    return f"{signing_input}.{b64u_encode(sign(signing_input.encode('ascii')))}"


def seg(raw: str | bytes) -> str:
    return b64u_encode(raw.encode() if isinstance(raw, str) else raw)


@pytest.fixture
def env() -> Env:
    clock = FrozenClock(T0)
    ring = KeyRing(
        MemoryKeyStore(), random_bytes(32), clock, KeyRingSettings(max_token_lifetime=3600)
    )
    ring.ensure_initialized()
    lookups: list[str] = []

    def resolve(kid: str) -> PublicKey | None:
        lookups.append(kid)
        return ring.public_key(kid)

    verifier = AccessTokenVerifier(
        resolve, issuer=ISS, audience=AUD, clock=clock, leeway=LEEWAY, max_lifetime=3600
    )
    return Env(clock, ring, TokenIssuer(ring, issuer=ISS, clock=clock), verifier, lookups)


# -- the baseline ---------------------------------------------------------------------------


def test_baseline_forged_claims_verify(env: Env) -> None:
    token = env.verify(env.token())
    assert (token.sub, token.aud, token.scopes) == ("agent-1", (AUD,), ("payments:read",))


def test_baseline_issued_token_verifies(env: Env) -> None:
    issued = env.issuer.issue(
        agent_id="agent-1",
        client_id="client-1",
        tenant="acme",
        env="prod",
        scopes=("payments:read",),
        audience=(AUD,),
        lifetime=300,
    )
    assert env.verify(issued.token).claims == issued.claims


# -- alg none, HMAC confusion, key-carrying headers ---------------------------------------

_NONE_CASINGS = sorted({"".join(c) for c in itertools.product(*zip("none", "NONE", strict=True))})


def test_there_are_sixteen_casings_of_none() -> None:
    assert len(_NONE_CASINGS) == 16


@pytest.mark.parametrize("alg", _NONE_CASINGS)
def test_alg_none_with_signature(env: Env, alg: str) -> None:
    env.refuse(env.token(env.header(alg=alg)), "unsupported_algorithm")
    assert env.lookups == []


@pytest.mark.parametrize("alg", _NONE_CASINGS)
def test_alg_none_without_signature(env: Env, alg: str) -> None:
    h, p = encode_segment(env.header(alg=alg)), encode_segment(env.claims())
    env.refuse(f"{h}.{p}.", "malformed_token")
    env.refuse(f"{h}.{p}", "malformed_token")
    assert env.lookups == []


def _public_key_forms(env: Env) -> dict[str, bytes]:
    raw = env.key.public.raw
    crypto = CryptoEdPublic.from_public_bytes(raw)
    return {
        "raw": raw,
        "pem": crypto.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": crypto.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk-json": json.dumps(env.key.public.to_jwk()).encode(),
        "jwk-json-compact": json.dumps(env.key.public.to_jwk(), separators=(",", ":")).encode(),
        "x-b64url": env.key.public.to_jwk()["x"].encode(),
    }


@pytest.mark.parametrize(
    "form", ["raw", "pem", "der", "jwk-json", "jwk-json-compact", "x-b64url", "empty"]
)
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256"])
def test_hmac_signed_with_our_public_key(env: Env, form: str, alg: str) -> None:
    secret = b"" if form == "empty" else _public_key_forms(env)[form]
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    mod = digest.get(alg, hashlib.sha256)
    token = env.token(env.header(alg=alg), signer=lambda m: hmac.new(secret, m, mod).digest())
    env.refuse(token, "unsupported_algorithm")
    assert env.lookups == []


def test_empty_secret_hs256(env: Env) -> None:
    token = env.token(
        env.header(alg="HS256"), signer=lambda m: hmac.new(b"", m, hashlib.sha256).digest()
    )
    env.refuse(token, "unsupported_algorithm")


@pytest.mark.parametrize(
    "alg", ["ES256", "RS256", "PS256", "ES256K", "EdDSA ", "eddsa", "EDDSA", "ed25519", "Ed448", ""]
)
def test_other_algorithms_are_refused(env: Env, alg: str) -> None:
    env.refuse(
        env.token(env.header(alg=alg)), "unsupported_algorithm" if alg else "malformed_token"
    )


def test_alg_must_be_a_string(env: Env) -> None:
    for alg in (None, 1, ["EdDSA"], {"EdDSA": True}, True):
        env.refuse(env.token(env.header(alg=alg)), "malformed_token")


def test_embedded_jwk_of_the_attacker(env: Env) -> None:
    attacker = Ed25519SigningKey.generate()
    header = env.header(kid=attacker.kid, jwk=attacker.public.to_jwk())
    env.refuse(env.token(header, signer=attacker.sign), "forbidden_header")
    assert env.lookups == []


def test_embedded_jwk_even_when_it_is_ours(env: Env) -> None:
    env.refuse(env.token(env.header(jwk=env.key.public.to_jwk())), "forbidden_header")


def test_x5c_header(env: Env) -> None:
    fake_cert = base64.b64encode(b"\x30\x82\x01\x00" + bytes(60)).decode()
    env.refuse(env.token(env.header(x5c=[fake_cert])), "forbidden_header")


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 - the class is the per-test recorder

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        body = json.dumps({"keys": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Recorder,), {"requests": []})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_recorder_records_a_request(recorder: tuple[str, list[str]]) -> None:
    """The recorder works, so its silence in the next tests means something."""
    import urllib.request

    url, seen = recorder
    with urllib.request.urlopen(f"{url}/probe") as resp:
        assert resp.status == 200
    assert seen == ["/probe"]


@pytest.mark.parametrize("name", ["jku", "x5u"])
def test_url_key_headers_are_never_fetched(
    env: Env, recorder: tuple[str, list[str]], name: str
) -> None:
    url, seen = recorder
    attacker = Ed25519SigningKey.generate()
    header = env.header(kid=attacker.kid, **{name: f"{url}/jwks.json"})
    env.refuse(env.token(header, signer=attacker.sign), "forbidden_header")
    # With our own key and kid the header is still refused, and still nothing is fetched.
    env.refuse(env.token(env.header(**{name: f"{url}/jwks.json"})), "forbidden_header")
    assert seen == []
    assert env.lookups == []


# -- kid --------------------------------------------------------------------------------------

_KID_INJECTIONS = {
    "path-traversal": "../../etc/passwd",
    "path-traversal-deep": "../../../../etc/passwd",
    "path-traversal-encoded": "..%2f..%2f..%2fetc%2fpasswd",
    "absolute-path": "/dev/random",
    "sql": "' OR 1=1 --",
    "sql-quoted": "' OR '1'='1' --",
    "sql-union": "x' UNION SELECT private_blob FROM signing_keys --",
    "nul": "abc\x00def",
    "only-nul": "\x00",
    "unicode": "ключ-🔑-\u202eevil",
    "max-length": "k" * MAX_KID_LENGTH,
    "too-long": "k" * (MAX_KID_LENGTH + 1),
    "very-long": "k" * 4000,
    "crlf": "kid\r\nX-Injected: 1",
    "wildcard": "*",
    "template": "{{7*7}}",
    "empty": "",
}


@pytest.mark.parametrize("kid", list(_KID_INJECTIONS.values()), ids=list(_KID_INJECTIONS))
def test_kid_injection_is_unknown_key(env: Env, kid: str) -> None:
    # json.dumps escapes non-ASCII, so every one of these travels as valid JSON text.
    h = seg(json.dumps(env.header(kid=kid)))
    env.refuse(raw_token(h, encode_segment(env.claims()), env.key.sign), "unknown_key")


def test_a_kid_with_a_lone_surrogate_is_malformed(env: Env) -> None:
    # json.dumps escapes it, so it travels as valid JSON text ("\ud800"), but it is no text.
    h = seg(json.dumps(env.header(kid="\ud800")))
    env.refuse(raw_token(h, encode_segment(env.claims()), env.key.sign), "malformed_token")


@pytest.mark.parametrize("kid", [None, 1, True, ["kid"], {"kid": "x"}], ids=repr)
def test_kid_of_the_wrong_type_or_missing(env: Env, kid: Any) -> None:
    header = env.header(kid=kid) if kid is not None else env.header(kid=_DROP)
    env.refuse(env.token(header), "unknown_key")


def test_unknown_kid_does_not_hammer_the_store(env: Env) -> None:
    store = env.ring._store  # the fake, to count reads
    calls = 0
    original = store.list_keys

    def counting() -> Any:
        nonlocal calls
        calls += 1
        return original()

    store.list_keys = counting  # type: ignore[method-assign]
    for i in range(50):
        env.refuse(env.token(env.header(kid=f"unknown-{i}")), "unknown_key")
    assert calls <= 1


# -- typ --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typ",
    [
        "at+jwt",
        "AT+JWT",
        "At+Jwt",
        "application/at+jwt",
        "APPLICATION/AT+JWT",
        "Application/at+JWT",
    ],
)
def test_typ_accepted(env: Env, typ: str) -> None:
    env.verify(env.token(env.header(typ=typ)))


@pytest.mark.parametrize(
    "typ",
    [
        "JWT",
        "jwt",
        "application/jwt",
        "dpop+jwt",
        "at+jwt ",
        " at+jwt",
        "at+jwt\x00",
        "application/application/at+jwt",
        "application/",
        "at-jwt",
        "atjwt",
        "",
        "\u0430t+jwt",  # Cyrillic a
        1,
        None,
        ["at+jwt"],
        True,
    ],
    ids=repr,
)
def test_typ_refused(env: Env, typ: Any) -> None:
    header = env.header(typ=typ) if typ is not None else env.header(typ=_DROP)
    env.refuse(env.token(header), "invalid_token_type")


# -- time -------------------------------------------------------------------------------------


def test_exp_one_second_inside_the_leeway(env: Env) -> None:
    env.clock.set(T0 + 300 + LEEWAY - 1)
    env.verify(env.token())


def test_exp_exactly_at_the_leeway_boundary(env: Env) -> None:
    env.clock.set(T0 + 300 + LEEWAY)
    env.refuse(env.token(), "token_expired")


def test_exp_one_second_past_the_leeway(env: Env) -> None:
    env.clock.set(T0 + 300 + LEEWAY + 1)
    env.refuse(env.token(), "token_expired")


def test_nbf_one_second_inside_the_leeway(env: Env) -> None:
    env.verify(env.token(claims=env.claims(nbf=T0 + LEEWAY - 1)))


def test_nbf_exactly_at_the_leeway_boundary(env: Env) -> None:
    env.verify(env.token(claims=env.claims(nbf=T0 + LEEWAY)))


def test_nbf_one_second_past_the_leeway(env: Env) -> None:
    env.refuse(env.token(claims=env.claims(nbf=T0 + LEEWAY + 1)), "token_not_yet_valid")


def test_iat_one_second_inside_the_leeway(env: Env) -> None:
    env.verify(env.token(claims=env.claims(iat=T0 + LEEWAY - 1, nbf=T0)))


def test_iat_exactly_at_the_leeway_boundary(env: Env) -> None:
    env.verify(env.token(claims=env.claims(iat=T0 + LEEWAY)))


def test_iat_one_second_past_the_leeway(env: Env) -> None:
    env.refuse(env.token(claims=env.claims(iat=T0 + LEEWAY + 1)), "token_issued_in_future")


def test_lifetime_over_the_maximum(env: Env) -> None:
    env.verify(env.token(claims=env.claims(exp=T0 + 3600)))
    env.refuse(env.token(claims=env.claims(exp=T0 + 3601)), "invalid_claim")


@pytest.mark.parametrize(
    "cnf", [{"jwk": {"kty": "OKP"}}, {"x5t": "abc"}, {"jkt": "a", "kid": "k"}], ids=repr
)
def test_a_confirmation_method_no_door_checks_is_refused(env: Env, cnf: dict[str, Any]) -> None:
    """Bound in its issuer's mind, unbound at every door that reads only jkt and x5t#S256."""
    env.refuse(env.token(claims=env.claims(cnf=cnf)), "invalid_claim")
    env.verify(env.token(claims=env.claims(cnf={"jkt": "a", "x5t#S256": "b"})))


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [True, False, "1800000000", [T0], {"t": T0}], ids=repr)
def test_time_claims_must_be_numbers(env: Env, name: str, value: Any) -> None:
    env.refuse(env.token(claims=env.claims(**{name: value})), "invalid_claim")


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
def test_time_claims_beyond_float_range(env: Env, name: str) -> None:
    env.refuse(env.token(claims=env.claims(**{name: 10**400})), "invalid_claim")
    env.refuse(env.token(claims=env.claims(**{name: -(10**400)})), "invalid_claim")


# -- issuer and audience ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "iss", ["https://evil.example", ISS + "/", ISS.upper(), " " + ISS, [ISS], 1], ids=repr
)
def test_wrong_iss(env: Env, iss: Any) -> None:
    env.refuse(env.token(claims=env.claims(iss=iss)), "invalid_issuer")


def test_wrong_aud(env: Env) -> None:
    env.refuse(env.token(claims=env.claims(aud="https://other.example")), "invalid_audience")


def test_aud_list_with_ours(env: Env) -> None:
    token = env.verify(env.token(claims=env.claims(aud=["https://other.example", AUD])))
    assert token.aud == ("https://other.example", AUD)


def test_aud_list_without_ours(env: Env) -> None:
    env.refuse(
        env.token(claims=env.claims(aud=["https://a.example", "https://b.example"])),
        "invalid_audience",
    )


@pytest.mark.parametrize("aud", [1, True, {"aud": AUD}, [], [AUD, 1], [[AUD]], ""], ids=repr)
def test_aud_of_the_wrong_type(env: Env, aud: Any) -> None:
    env.refuse(env.token(claims=env.claims(aud=aud)), "invalid_audience")


@pytest.mark.parametrize("aud", [1, {"aud": AUD}, [], [AUD, 1], ""], ids=repr)
def test_aud_of_the_wrong_type_without_an_audience_rule(env: Env, aud: Any) -> None:
    """The server's verifier runs with audience=None; a malformed aud is still refused."""
    verifier = AccessTokenVerifier(env.ring.public_key, issuer=ISS, audience=None, clock=env.clock)
    with pytest.raises(TokenError) as err:
        verifier.verify(env.token(claims=env.claims(aud=aud)))
    assert err.value.code == "invalid_claim"


# -- tampering --------------------------------------------------------------------------------


def test_tampered_header(env: Env) -> None:
    token = env.token()
    _, p, s = token.split(".")
    h = encode_segment({**env.header(), "extra": 1})
    env.refuse(f"{h}.{p}.{s}", "invalid_signature")


def test_header_swapped_to_ed25519_alg(env: Env) -> None:
    """alg is inside the signed bytes: switching EdDSA to Ed25519 breaks the signature."""
    token = env.token()
    _, p, s = token.split(".")
    h = encode_segment(env.header(alg="Ed25519"))
    env.refuse(f"{h}.{p}.{s}", "invalid_signature")


def test_tampered_payload(env: Env) -> None:
    h, _, s = env.token().split(".")
    p = encode_segment(env.claims(scope="payments:read payments:write"))
    env.refuse(f"{h}.{p}.{s}", "invalid_signature")


@pytest.mark.parametrize("index", range(64))
def test_every_signature_byte(env: Env, index: int) -> None:
    h, p, s = env.token().split(".")
    sig = bytearray(b64u_decode(s))
    sig[index] ^= 0x01
    env.refuse(f"{h}.{p}.{b64u_encode(bytes(sig))}", "invalid_signature")


@pytest.mark.parametrize("length", [0, 1, 32, 63, 65, 128])
def test_signature_of_the_wrong_length(env: Env, length: int) -> None:
    h, p, _ = env.token().split(".")
    code = "malformed_token" if length == 0 else "invalid_signature"
    env.refuse(f"{h}.{p}.{b64u_encode(bytes(length))}", code)


def test_signature_of_another_token(env: Env) -> None:
    h, p, _ = env.token().split(".")
    _, _, s2 = env.token(claims=env.claims(jti="other")).split(".")
    env.refuse(f"{h}.{p}.{s2}", "invalid_signature")


# -- structure --------------------------------------------------------------------------------


def _mutations(token: str) -> dict[str, str]:
    h, p, s = token.split(".")
    return {
        "two-segments": f"{h}.{p}",
        "four-segments": f"{token}.{s}",
        "five-segments": f"{h}.{p}.{s}.{h}.{p}",
        "trailing-dot": f"{token}.",
        "leading-dot": f".{token}",
        "empty-header": f".{p}.{s}",
        "empty-payload": f"{h}..{s}",
        "empty": "",
        "dots": "..",
        "padding-on-signature": f"{token}==",
        "padding-on-header": f"{h}=.{p}.{s}",
        "padding-mid-payload": f"{h}.{p[:4]}={p[4:]}.{s}",
        "leading-space": f" {token}",
        "trailing-space": f"{token} ",
        "trailing-newline": f"{token}\n",
        "space-in-payload": f"{h}.{p[:8]} {p[8:]}.{s}",
        "tab-in-signature": f"{h}.{p}.{s[:8]}\t{s[8:]}",
        "non-ascii": f"{token}é",
        "non-ascii-header": f"ë{token}",
        "fullwidth-dot": token.replace(".", "\uff0e", 1),
    }


_MUTATION_NAMES = list(_mutations("a.b.c"))


@pytest.mark.parametrize("name", _MUTATION_NAMES)
def test_structural_mutations(env: Env, name: str) -> None:
    env.refuse(_mutations(env.token())[name], "malformed_token")
    assert env.lookups == []


@pytest.mark.parametrize("segment", [0, 1, 2])
def test_standard_base64_alphabet(env: Env, segment: int) -> None:
    """'+' and '/' are base64, not base64url (RFC 7515 §2)."""
    for i in range(200):
        filler = "?>~" * (i % 9) + str(i)
        token = env.token(env.header(x=filler), env.claims(x=filler))
        parts = token.split(".")
        if "-" in parts[segment] or "_" in parts[segment]:
            break
    parts[segment] = parts[segment].replace("-", "+").replace("_", "/")
    assert "+" in parts[segment] or "/" in parts[segment]
    env.refuse(".".join(parts), "malformed_token")


def _noncanonical(segment: str) -> str:
    """The same bytes with non-zero unused trailing bits."""
    rem = len(segment) % 4
    assert rem in (2, 3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    value = alphabet.index(segment[-1]) | 1
    return segment[:-1] + alphabet[value]


def test_noncanonical_trailing_bits_in_the_signature(env: Env) -> None:
    h, p, s = env.token().split(".")
    assert len(s) == 86  # 64 bytes: 4 unused bits in the last character
    variant = _noncanonical(s)
    assert variant != s
    # A lenient decoder would read the very same signature bytes.
    assert base64.urlsafe_b64decode(variant + "==") == base64.urlsafe_b64decode(s + "==")
    env.refuse(f"{h}.{p}.{variant}", "malformed_token")


def test_noncanonical_trailing_bits_in_header_and_payload(env: Env) -> None:
    for pad in range(3):
        claims = env.claims(jti="j" * (4 + pad))
        header = env.header(x="y" * pad)
        h = encode_segment(header)
        p = encode_segment(claims)
        token = raw_token(h, p, env.key.sign)
        if len(p) % 4:
            env.refuse(raw_token(h, _noncanonical(p), env.key.sign), "malformed_token")
        if len(h) % 4:
            env.refuse(raw_token(_noncanonical(h), p, env.key.sign), "malformed_token")
        env.verify(token)


def test_not_a_string(env: Env) -> None:
    token = env.token()
    for value in (token.encode(), None, 1, [token]):
        env.refuse(value, "malformed_token")


# -- JSON -------------------------------------------------------------------------------------


def test_duplicate_member_in_header(env: Env) -> None:
    kid = env.key.kid
    h = seg(f'{{"alg":"none","alg":"EdDSA","typ":"at+jwt","kid":"{kid}"}}')
    env.refuse(raw_token(h, encode_segment(env.claims()), env.key.sign), "malformed_token")


def test_duplicate_member_in_payload(env: Env) -> None:
    body = json.dumps(env.claims())[:-1] + ', "sub": "admin"}'
    token = raw_token(encode_segment(env.header()), seg(body), env.key.sign)
    env.refuse(token, "malformed_token")


def test_duplicate_member_nested_in_payload(env: Env) -> None:
    body = json.dumps(env.claims())[:-1] + ', "cnf": {"jkt": "a", "jkt": "b"}}'
    env.refuse(raw_token(encode_segment(env.header()), seg(body), env.key.sign), "malformed_token")


def test_crit_header(env: Env) -> None:
    env.refuse(env.token(env.header(crit=["exp"], exp=1)), "forbidden_header")
    env.refuse(env.token(env.header(crit=[])), "forbidden_header")


@pytest.mark.parametrize("b64", [False, True])
def test_b64_header(env: Env, b64: bool) -> None:
    env.refuse(env.token(env.header(b64=b64, crit=["b64"])), "forbidden_header")
    env.refuse(env.token(env.header(b64=b64)), "forbidden_header")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999"])
@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
def test_non_finite_numbers(env: Env, literal: str, name: str) -> None:
    body = json.dumps(env.claims(**{name: _DROP}))[:-1] + f', "{name}": {literal}}}'
    env.refuse(raw_token(encode_segment(env.header()), seg(body), env.key.sign), "malformed_token")


def test_non_finite_number_in_header(env: Env) -> None:
    h = seg(f'{{"alg":"EdDSA","typ":"at+jwt","kid":"{env.key.kid}","x":NaN}}')
    env.refuse(raw_token(h, encode_segment(env.claims()), env.key.sign), "malformed_token")


@pytest.mark.parametrize(
    "body",
    ["[]", "[1]", "1", '"claims"', "null", "true", "", "{", '{"a":1} x', "\ufeff{}"],
    ids=repr,
)
def test_non_object_json(env: Env, body: str) -> None:
    header = encode_segment(env.header())
    if body:
        env.refuse(raw_token(header, seg(body), env.key.sign), "malformed_token")
        env.refuse(
            raw_token(seg(body), encode_segment(env.claims()), env.key.sign), "malformed_token"
        )


def test_invalid_utf8(env: Env) -> None:
    env.refuse(
        raw_token(encode_segment(env.header()), seg(b'{"sub":"\xff"}'), env.key.sign),
        "malformed_token",
    )


def test_deep_nesting(env: Env) -> None:
    """Nesting deep enough to exhaust the decoder's recursion is refused, not raised."""
    body = '{"x":' + "[" * 2500 + "]" * 2500 + "}"
    token = raw_token(encode_segment(env.header()), seg(body), env.key.sign)
    assert len(token) <= MAX_TOKEN_BYTES
    env.refuse(token, "malformed_token")
    body = '{"x":' + "[" * 100 + "]" * 100 + "}"
    env.refuse(raw_token(encode_segment(env.header()), seg(body), env.key.sign), "missing_claim")


# -- size -------------------------------------------------------------------------------------


def _token_of_length(env: Env, length: int) -> str:
    """The shortest token of at least ``length`` characters (base64 grows 4 per 3 bytes)."""
    base = len(env.token(claims=env.claims(pad="")))
    for pad in range(max(0, (length - base) * 3 // 4 - 8), length):
        token = env.token(claims=env.claims(pad="x" * pad))
        if len(token) >= length:
            return token
    raise AssertionError("unreachable")


def test_largest_accepted_token(env: Env) -> None:
    token = _token_of_length(env, MAX_TOKEN_BYTES - 3)
    assert MAX_TOKEN_BYTES - 3 <= len(token) <= MAX_TOKEN_BYTES
    env.verify(token)


def test_oversize_token(env: Env) -> None:
    token = _token_of_length(env, MAX_TOKEN_BYTES + 1)
    assert len(token) > MAX_TOKEN_BYTES
    env.refuse(token, "token_too_large")
    env.refuse("a" * 1_000_000, "token_too_large")
    assert env.lookups == []


# -- claims -----------------------------------------------------------------------------------


def test_sub_differs_from_agent_id(env: Env) -> None:
    err = env.refuse(env.token(claims=env.claims(sub="agent-2")), "invalid_claim")
    assert err.details["claim"] == "sub"


@pytest.mark.parametrize("name", sorted(ACCESS_TOKEN_CLAIMS))
def test_null_required_claim(env: Env, name: str) -> None:
    err = env.refuse(env.token(claims=env.claims(**{name: None})), "missing_claim")
    assert err.details["claim"] == name


@pytest.mark.parametrize("name", sorted(ACCESS_TOKEN_CLAIMS))
def test_missing_required_claim(env: Env, name: str) -> None:
    err = env.refuse(env.token(claims=env.claims(**{name: _DROP})), "missing_claim")
    assert err.details["claim"] == name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sub", 1),
        ("sub", ""),
        ("agent_id", True),
        ("client_id", ["c"]),
        ("tenant", {"id": "acme"}),
        ("env", 0),
        ("jti", ""),
        ("jti", 7),
        ("jti", "j" * 257),
        ("scope", ["payments:read"]),
        ("cnf", "jkt"),
        ("single_use", "yes"),
        ("single_use", 1),
    ],
    ids=repr,
)
def test_claims_of_the_wrong_type(env: Env, name: str, value: Any) -> None:
    over = {name: value}
    if name == "sub":
        over["agent_id"] = value  # so the type, not the mismatch, is what fails
    env.refuse(env.token(claims=env.claims(**over)), "invalid_claim")


def test_extra_claims_cannot_override_on_issue(env: Env) -> None:
    issued = env.issuer.issue(
        agent_id="agent-1",
        client_id="client-1",
        tenant="acme",
        env="prod",
        scopes=("payments:read",),
        audience=(AUD,),
        lifetime=300,
        extra={"sub": "admin", "iss": "https://evil.example", "scope": "*", "note": "x"},
    )
    token = env.verify(issued.token)
    assert (token.sub, token.claims["iss"], token.scopes) == ("agent-1", ISS, ("payments:read",))
    assert token.claims["note"] == "x"


def test_issue_caps_the_lifetime_at_the_ring_maximum(env: Env) -> None:
    issued = env.issuer.issue(
        agent_id="agent-1",
        client_id="client-1",
        tenant="acme",
        env="prod",
        scopes=(),
        audience=(AUD,),
        lifetime=86400,
    )
    assert issued.claims["exp"] - issued.claims["iat"] == 3600
    env.verify(issued.token)


def test_issue_refuses_to_mint_nan(env: Env) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        env.issuer.issue(
            agent_id="agent-1",
            client_id="client-1",
            tenant="acme",
            env="prod",
            scopes=(),
            audience=(AUD,),
            lifetime=60,
            extra={"score": float("nan")},
        )


# -- keys -------------------------------------------------------------------------------------


def test_key_not_in_the_ring(env: Env) -> None:
    stranger = Ed25519SigningKey.generate()
    env.refuse(env.token(env.header(kid=stranger.kid), signer=stranger.sign), "unknown_key")


def test_our_kid_with_a_strangers_signature(env: Env) -> None:
    stranger = Ed25519SigningKey.generate()
    env.refuse(env.token(signer=stranger.sign), "invalid_signature")


def test_next_key_kid_with_the_active_keys_signature(env: Env) -> None:
    nxt = next(r for r in env.ring.records() if r.state.value == "next")
    env.refuse(env.token(env.header(kid=nxt.kid)), "invalid_signature")


def test_retired_key_inside_its_overlap_then_removed(env: Env) -> None:
    old_kid = env.key.kid
    before = env.token()  # signed by the active key at T0, exp T0 + 300
    env.clock.advance(301)  # the next key has been published longer than publish_lead
    env.ring.rotate()
    assert env.key.kid != old_kid
    retired = _retired_signer(env, old_kid)
    env.verify(before)  # signed before the rotation: verifies until its own expiry
    env.clock.set(T0 + 300 + LEEWAY)
    env.refuse(before, "token_expired")
    # The longest token the old key can have signed: minted at the rotation, max lifetime.
    rotated_at = T0 + 301
    longest = env.token(
        env.header(kid=old_kid),
        env.claims(iat=rotated_at, nbf=rotated_at, exp=rotated_at + 3600),
        signer=retired,
    )
    remove_after = rotated_at + 3600 + LEEWAY
    env.clock.set(remove_after - 1)
    env.verify(longest)
    env.clock.set(remove_after)
    env.refuse(longest, "unknown_key")
    # A token freshly signed with the retired key (say, leaked) is refused too, though no rotation
    # has pruned the record from the store yet.
    assert old_kid in {r.kid for r in env.ring.records()}
    fresh = env.token(
        env.header(kid=old_kid),
        env.claims(iat=remove_after, nbf=remove_after, exp=remove_after + 60),
        signer=retired,
    )
    env.refuse(fresh, "unknown_key")
    # ... and once a later rotation archives it (private key erased, public half kept only for
    # the evidence set) it is still unknown to every token check, after a reload too.
    env.ring.rotate(force=True)
    (archived,) = [r for r in env.ring.records() if r.kid == old_kid]
    assert archived.private_blob is None
    env.refuse(fresh, "unknown_key")
    env.ring.load()
    env.refuse(fresh, "unknown_key")


def _retired_signer(env: Env, kid: str) -> Callable[[bytes], bytes]:
    from aegis.crypto.keyring import decrypt_seed

    record = next(r for r in env.ring.records() if r.kid == kid)
    assert record.private_blob is not None
    return Ed25519SigningKey(decrypt_seed(env.ring._kek, kid, record.private_blob)).sign
