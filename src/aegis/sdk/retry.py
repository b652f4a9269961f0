"""When the SDK sends a call again, and when it must not.

A security denial is final: a refused signature, a replayed proof, a denied policy, a broken
delegation chain, an inactive agent are raised at once and the call is never sent again. Only four
answers lead to another attempt, each bounded:

* ``token_expired`` (401): the cached token is dropped and a new one fetched, **once**;
* ``use_dpop_nonce`` (401 with ``DPoP-Nonce``, RFC 9449 §8): re-signed with the nonce, **once**;
* a 503 ``*_unavailable``: exponential backoff (``Retry-After`` honoured up to the cap), at most
  :attr:`RetryPolicy.unavailable_attempts` more times;
* ``approval_needed`` with an ``approval_id`` and ``status_url``: wait for the human, then **once**
  more with the one-time override.

Every attempt carries a freshly signed DPoP proof; a proof is never sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import httpx

from aegis.sdk.errors import AegisClientError
from aegis.sdk.wire import error_from_response, is_gateway_refusal, parse_body

__all__ = ["Attempts", "RetryPolicy", "Step", "plan"]

StepKind = Literal["done", "refresh", "nonce", "backoff", "approval", "raise"]
_NONCE_HEADER: Final = "dpop-nonce"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: Further attempts after a 503 ``*_unavailable`` (0 disables the retry).
    unavailable_attempts: int = 2
    #: First backoff delay in seconds; doubled each time up to ``backoff_max``.
    backoff_base: float = 0.2
    backoff_max: float = 2.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        delay = float(self.backoff_base * (2**attempt))
        if retry_after is not None and retry_after.isascii() and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, self.backoff_max)


@dataclass(slots=True)
class Attempts:
    """What one call has already tried."""

    refreshed: bool = False
    nonced: bool = False
    unavailable: int = 0
    approved: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    error: AegisClientError | None = None
    delay: float = 0.0
    nonce: str | None = None


def plan(
    response: httpx.Response,
    attempts: Attempts,
    policy: RetryPolicy,
    *,
    approvals: bool,
    raise_for_denial: bool,
) -> Step:
    """The next step after ``response`` (already read) and the attempts made so far; records the
    attempt it chooses in ``attempts``."""
    if response.status_code < 400:
        return Step("done")
    body = parse_body(response)
    if not is_gateway_refusal(response, body):
        return Step("done")  # the upstream's own answer, not an Aegis decision
    error = error_from_response(response)
    code = error.code
    if code == "token_expired" and not attempts.refreshed:
        attempts.refreshed = True
        return Step("refresh", error)
    nonce = response.headers.get(_NONCE_HEADER)
    if code == "use_dpop_nonce" and nonce and not attempts.nonced:
        attempts.nonced = True
        return Step("nonce", error, nonce=nonce)
    if (
        response.status_code == 503
        and code.endswith("_unavailable")
        and attempts.unavailable < policy.unavailable_attempts
    ):
        delay = policy.delay(attempts.unavailable, response.headers.get("retry-after"))
        attempts.unavailable += 1
        return Step("backoff", error, delay=delay)
    if (
        code == "approval_needed"
        and approvals
        and not attempts.approved
        and isinstance(body.get("approval_id"), str)
        and isinstance(body.get("status_url"), str)
    ):
        attempts.approved = True
        return Step("approval", error)
    return Step("raise", error) if raise_for_denial else Step("done", error)
