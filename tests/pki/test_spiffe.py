"""SPIFFE ID parsing against the spec's examples, its rules as properties, and X509-SVID leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from aegis.errors import AegisError
from aegis.pki.spiffe import (
    MAX_SPIFFE_ID_BYTES,
    agent_spiffe_id,
    check_leaf_svid,
    parse_agent_spiffe_id,
    parse_spiffe_id,
)
from tests.pki.conftest import TRUST_DOMAIN, Pki
from tests.pki.forge import forge_leaf

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "spiffe_ids.json").read_text()
)

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["id"])
def test_spec_valid_examples_parse(case: dict[str, str]) -> None:
    sid = parse_spiffe_id(case["id"])
    assert (sid.trust_domain, sid.path) == (case["trust_domain"], case["path"])
    assert str(sid) == case["id"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["id"] or "empty")
def test_spec_invalid_examples_are_refused_naming_the_rule(case: dict[str, str]) -> None:
    with pytest.raises(AegisError) as info:
        parse_spiffe_id(case["id"])
    assert info.value.code == "spiffe_id_invalid"
    assert case["rule"] in info.value.message


def test_length_limits() -> None:
    domain = "a" * 255
    assert parse_spiffe_id(f"spiffe://{domain}").trust_domain == domain
    with pytest.raises(AegisError, match="255 bytes"):
        parse_spiffe_id(f"spiffe://{'a' * 256}")
    base = "spiffe://td/"
    fits = base + "p" * (MAX_SPIFFE_ID_BYTES - len(base))
    assert len(str(parse_spiffe_id(fits))) == MAX_SPIFFE_ID_BYTES
    with pytest.raises(AegisError, match="2048 bytes"):
        parse_spiffe_id(fits + "p")


@given(trust_domains, st.lists(segments, max_size=6))
def test_every_well_formed_id_round_trips(domain: str, path: list[str]) -> None:
    value = f"spiffe://{domain}" + "".join(f"/{s}" for s in path)
    sid = parse_spiffe_id(value)
    assert str(sid) == value
    assert sid.trust_domain == domain


@given(trust_domains, st.lists(segments, min_size=1, max_size=4), st.sampled_from('?#%@: $\\"<>é'))
def test_any_forbidden_character_anywhere_is_refused(
    domain: str, path: list[str], bad: str
) -> None:
    value = f"spiffe://{domain}" + "".join(f"/{s}" for s in path)
    for position in (len("spiffe://") + 1, len(value)):
        candidate = value[:position] + bad + value[position:]
        if bad == "/" and position == len(value):
            candidate = value + "/"  # a trailing slash, the one place '/' is itself wrong
        with pytest.raises(AegisError):
            parse_spiffe_id(candidate)


@given(st.text(max_size=80))
def test_parser_never_crashes_and_accepts_only_what_it_prints(value: str) -> None:
    code = None
    try:
        sid = parse_spiffe_id(value)
    except AegisError as exc:
        code = exc.code
    if code is None:
        assert str(sid) == value
    else:
        assert code == "spiffe_id_invalid"


def test_agent_ids_have_exactly_the_aegis_shape() -> None:
    value = agent_spiffe_id(TRUST_DOMAIN, "t1", "prod", "alpha")
    assert value == "spiffe://example.org/tenant/t1/env/prod/agent/alpha"
    ident = parse_agent_spiffe_id(value, TRUST_DOMAIN)
    assert (ident.tenant, ident.env, ident.agent) == ("t1", "prod", "alpha")
    for bad in (
        "spiffe://other.org/tenant/t1/env/prod/agent/alpha",
        "spiffe://example.org/tenant/t1/env/prod/agent",
        "spiffe://example.org/tenant/t1/env/prod/agent/alpha/extra",
        "spiffe://example.org/tenant/t1/environment/prod/agent/alpha",
    ):
        with pytest.raises(AegisError):
            parse_agent_spiffe_id(bad, TRUST_DOMAIN)


def _leaf(pki: Pki, **changes: Any) -> x509.Certificate:
    """A certificate signed by the real intermediate, with one deliberate change."""
    ku = {k: changes.pop(k) for k in ("ds", "kcs") if k in changes}
    _, cert = forge_leaf(pki, record=False, **changes)
    if not ku:
        return cert
    # Key usage changes need a rebuild: copy every extension but KeyUsage.
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        if not isinstance(ext.value, x509.KeyUsage):
            b = b.add_extension(ext.value, critical=ext.critical)
    usage = x509.KeyUsage(
        ku.get("ds", True), False, False, False, False, ku.get("kcs", False), False, False, False
    )
    b = b.add_extension(usage, critical=True)
    return b.sign(pki.ca.current.key, hashes.SHA256())


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"uris": []}, "spiffe_id_invalid", "exactly one uri san, found 0"),
        (
            {
                "uris": [
                    "spiffe://example.org/tenant/t1/env/prod/agent/alpha",
                    "spiffe://example.org/x",
                ]
            },
            "spiffe_id_invalid",
            "exactly one uri san, found 2",
        ),
        (
            {"uris": ["spiffe://example.org/tenant/t1/env/prod/agent/a?b"]},
            "spiffe_id_invalid",
            "query",
        ),
        ({"ca": True}, "cert_wrong_usage", "ca certificate"),
        ({"ds": False}, "cert_wrong_usage", "digitalSignature"),
        ({"kcs": True}, "cert_wrong_usage", "keyCertSign"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "cert_wrong_usage", "clientAuth"),
    ],
)
def test_leaf_rules(pki: Pki, changes: dict[str, Any], code: str, words: str) -> None:
    with pytest.raises(AegisError) as info:
        check_leaf_svid(_leaf(pki, **changes), TRUST_DOMAIN, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    assert info.value.code == code
    assert words in info.value.message


def test_a_proper_leaf_passes(pki: Pki) -> None:
    ident = check_leaf_svid(_leaf(pki), TRUST_DOMAIN, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    assert ident.agent == "alpha"
