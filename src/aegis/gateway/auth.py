"""Reading credentials from a call: the ``Authorization`` schemes of RFC 6750 (Bearer) and RFC 9449
(DPoP), and the ``WWW-Authenticate`` challenges a 401 carries.

Ambiguity is refused before any token is looked at (``invalid_request``): two ``Authorization``
headers, two ``DPoP`` headers (RFC 9449 §4.3: "there is not more than one DPoP HTTP request header
field"), or a value carrying more than one credential (``Bearer x, DPoP y``). A DPoP proof sent with
the Bearer scheme is refused too, so a caller never learns which of the two the gateway would have
believed. Scheme names are case-insensitive (RFC 9110 §11.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from aegis.errors import AegisError, InvalidRequest, TokenError
from aegis.gateway.context import CallContext
from aegis.tokens.dpop import DPOP_ALGS

__all__ = ["DPOP_CHALLENGE_ALGS", "Credentials", "challenge", "read_credentials"]

#: Advertised in DPoP challenges (RFC 9449 §7.1 ``algs``); ``Ed25519`` is accepted as well.
DPOP_CHALLENGE_ALGS: Final = " ".join(a for a in ("EdDSA", "ES256") if a in DPOP_ALGS)
#: RFC 6750 §2.1 b64token; a JWS compact serialisation is a subset of it.
_B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

Scheme = Literal["bearer", "dpop"]


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: Scheme
    token: str
    #: The DPoP proof (only with the DPoP scheme).
    proof: str | None


def read_credentials(ctx: CallContext) -> Credentials:
    """The one access token of the call and its proof; raises a typed error on any ambiguity."""
    auth: list[str] = []
    proofs: list[str] = []
    for name, value in ctx.headers:  # one pass; names are lowercase in a CallContext
        if name == "authorization":
            auth.append(value)
        elif name == "dpop":
            proofs.append(value)
    if len(auth) > 1:
        raise InvalidRequest("send exactly one Authorization header")
    if len(proofs) > 1:
        raise InvalidRequest("send exactly one DPoP header")
    if not auth:
        raise AegisError("an access token is required", code="unauthenticated")
    scheme, _, token = auth[0].strip().partition(" ")
    token = token.strip()
    name = scheme.lower()
    if name not in ("bearer", "dpop"):
        raise AegisError("use the DPoP or Bearer authorization scheme", code="unauthenticated")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidRequest("the Authorization header must carry exactly one token")
    if name == "bearer":
        if proofs:
            raise InvalidRequest("a DPoP proof was sent with the Bearer scheme; use DPoP")
        return Credentials("bearer", token, None)
    if not proofs:
        raise TokenError("the DPoP scheme needs a DPoP proof header", code="invalid_dpop_proof")
    return Credentials("dpop", token, proofs[0])


def challenge(code: str, scheme: Scheme | None, oauth_error: str) -> str:
    """``WWW-Authenticate`` for a 401: RFC 9449 §7.1 for DPoP, RFC 6750 §3 for Bearer.

    Without a presented credential (``unauthenticated``), both schemes are offered with no
    ``error`` (RFC 6750 §3.1: "the resource server SHOULD NOT include an error code").
    """
    dpop = f'DPoP algs="{DPOP_CHALLENGE_ALGS}"'
    if code in ("invalid_dpop_proof", "use_dpop_nonce"):  # the DPoP scheme without its proof too
        return f'DPoP error="{oauth_error}", algs="{DPOP_CHALLENGE_ALGS}"'
    if code == "unauthenticated" or scheme is None:
        return f'{dpop}, Bearer realm="aegis"'
    if scheme == "dpop":
        return f'DPoP error="{oauth_error}", algs="{DPOP_CHALLENGE_ALGS}"'
    return f'Bearer realm="aegis", error="{oauth_error}"'
