"""``aegis attest``: check a decision attestation offline against the JWKS (docs/audit.md).

An attestation is the ``x-aegis-attestation`` header of a gateway answer (also stored in the audit
record): a compact JWS, ``typ aegis-attestation+jwt``, signed by the key ring. Verification needs
only the JWK Set; with ``--request-digest`` it also checks which request the decision was about.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from aegis.audit.attest import ATTESTATION_TYP, attestation_rules
from aegis.cli._common import JsonOpt, emit
from aegis.cli.audit import IssuerOpt, JwksOpt, load_jwks
from aegis.errors import AegisError, EvidenceError
from aegis.tokens.verifier import VerifyRules, verify_jwt

__all__ = ["app"]

app = typer.Typer(help="Decision attestations.", no_args_is_help=True)


@app.command()
def verify(
    attestation: Annotated[
        str, typer.Argument(help="The attestation JWS, a file holding it, or - for stdin.")
    ],
    jwks: JwksOpt,
    issuer: IssuerOpt = None,
    request_digest: Annotated[
        str | None, typer.Option("--request-digest", help="Require this request digest.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify an attestation's signature and claims offline; print its claims."""
    if attestation == "-":
        token = sys.stdin.read().strip()
    elif attestation.count(".") == 2 and "/" not in attestation:
        token = attestation.strip()  # a compact JWS (base64url has no '/')
    else:
        try:
            token = Path(attestation).read_text().strip()
        except OSError as exc:
            raise EvidenceError(f"cannot read {attestation}: {exc.strerror}") from exc
    rules = attestation_rules(issuer) if issuer is not None else _any_issuer()
    try:
        claims = verify_jwt(token, load_jwks(jwks), rules, 0.0).payload
    except AegisError as exc:
        if isinstance(exc, EvidenceError):
            raise
        raise EvidenceError(f"attestation does not verify: {exc.code}: {exc.message}") from exc
    if request_digest is not None and claims.get("request_digest") != request_digest:
        raise EvidenceError("attestation is about another request (request_digest differs)")
    emit(
        {"ok": True, "claims": claims},
        as_json,
        lambda c: c.print(
            f"ok: decision {claims.get('decision')} on {claims.get('tool')} for agent "
            f"{claims.get('agent_id')} (decision {claims.get('decision_id')}, "
            f"policy {claims.get('policy_version')})"
        ),
    )


def _any_issuer() -> VerifyRules:
    rules = attestation_rules("")
    return VerifyRules(
        typ=ATTESTATION_TYP,
        issuer=None,
        audience=None,
        required=rules.required,
        leeway=rules.leeway,
    )
