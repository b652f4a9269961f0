"""Signed callbacks and signed deliveries: Slack request signing, Teams outgoing-webhook HMAC, and
the HMAC signature on generic webhook bodies.

* **Slack** (api.slack.com "Verifying requests from Slack"): ``X-Slack-Signature`` is ``v0=`` and
  the hex HMAC-SHA256, under the app's signing secret, of ``v0:<X-Slack-Request-Timestamp>:<raw
  body>``; a timestamp more than five minutes from our clock is refused, so a captured request
  cannot be replayed later.
* **Teams** outgoing webhooks: ``Authorization: HMAC <base64>`` of the HMAC-SHA256 of the raw
  body under the base64-decoded security token. Teams sends no timestamp; a decision can only be
  taken once per request, so a replayed reply changes nothing (it is refused as decided).
* **Generic webhooks**: Aegis signs what it sends as Slack does (``X-Aegis-Timestamp``,
  ``X-Aegis-Signature: v0=<hex>``), so receivers can reuse a Slack verifier.

Every comparison is constant-time; every refusal is a typed error with its own code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Final

from aegis.errors import AegisError

__all__ = [
    "SLACK_MAX_AGE",
    "sign_v0",
    "verify_slack",
    "verify_teams",
]

#: Slack's replay window (seconds).
SLACK_MAX_AGE: Final = 300


def sign_v0(secret: bytes, timestamp: str, body: bytes) -> str:
    """``v0=<hex HMAC-SHA256(secret, "v0:" timestamp ":" body)>``."""
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    return "v0=" + hmac.new(secret, base, hashlib.sha256).hexdigest()


def _unsigned(what: str) -> AegisError:
    return AegisError(f"the callback carries no {what}; it is not from the channel",
                      code="callback_unsigned")  # fmt: skip


def verify_slack(
    secret: bytes, *, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> None:
    """Raise unless ``body`` was signed by Slack with ``secret`` within the last five minutes."""
    if not timestamp or not signature:
        raise _unsigned("X-Slack-Signature and X-Slack-Request-Timestamp")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise AegisError("the callback timestamp is not a number", code="callback_stale")
    if abs(now - int(timestamp)) > SLACK_MAX_AGE:
        raise AegisError(
            "the callback timestamp is more than five minutes from this clock",
            code="callback_stale",
        )
    expected = sign_v0(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace")):
        raise AegisError(
            "the callback signature does not match its body", code="callback_signature_invalid"
        )


def verify_teams(secret: bytes, *, authorization: str | None, body: bytes) -> None:
    """Raise unless ``Authorization: HMAC <b64>`` is the HMAC-SHA256 of ``body`` under the
    base64-decoded ``secret``."""
    if not authorization:
        raise _unsigned("Authorization: HMAC signature")
    scheme, _, presented = authorization.partition(" ")
    if scheme != "HMAC" or not presented:
        raise _unsigned("Authorization: HMAC signature")
    try:
        key = base64.b64decode(secret, validate=True)
        given = base64.b64decode(presented.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AegisError(
            "the callback signature is not base64", code="callback_signature_invalid"
        ) from None
    expected = hmac.new(key, body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, given):
        raise AegisError(
            "the callback signature does not match its body", code="callback_signature_invalid"
        )
