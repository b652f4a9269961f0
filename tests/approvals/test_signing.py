"""Callback verification: Slack's v0 request signing (five-minute window) and Teams' HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from aegis.approvals.signing import SLACK_MAX_AGE, sign_v0, verify_slack, verify_teams
from aegis.errors import AegisError

SECRET = b"8f742231b10e8888abcd99yyyzzz85a5"
NOW = 1_700_000_000.0
BODY = b"payload=%7B%22type%22%3A%22block_actions%22%7D"


def test_slack_signature_matches_slacks_published_scheme() -> None:
    # The base string is v0:<timestamp>:<body>; the signature is v0= and the hex HMAC-SHA256.
    expected = hmac.new(SECRET, b"v0:1700000000:" + BODY, hashlib.sha256).hexdigest()
    assert sign_v0(SECRET, "1700000000", BODY) == f"v0={expected}"
    verify_slack(SECRET, timestamp="1700000000", signature=f"v0={expected}", body=BODY, now=NOW)


@pytest.mark.parametrize(
    ("timestamp", "signature", "body", "code"),
    [
        (None, None, BODY, "callback_unsigned"),
        ("1700000000", None, BODY, "callback_unsigned"),
        (None, sign_v0(SECRET, "1700000000", BODY), BODY, "callback_unsigned"),
        ("1700000000", sign_v0(b"another secret", "1700000000", BODY), BODY,
         "callback_signature_invalid"),
        ("1700000000", sign_v0(SECRET, "1700000000", BODY), BODY + b"x",
         "callback_signature_invalid"),
        ("1700000000", "v0=" + "0" * 64, BODY, "callback_signature_invalid"),
        ("1700000000", sign_v0(SECRET, "1700000000", BODY).upper(), BODY,
         "callback_signature_invalid"),
        (str(int(NOW) - SLACK_MAX_AGE - 1), sign_v0(SECRET, str(int(NOW) - SLACK_MAX_AGE - 1), BODY),
         BODY, "callback_stale"),
        (str(int(NOW) + SLACK_MAX_AGE + 1), sign_v0(SECRET, str(int(NOW) + SLACK_MAX_AGE + 1), BODY),
         BODY, "callback_stale"),
        ("-5", "v0=00", BODY, "callback_stale"),
        ("1e9", "v0=00", BODY, "callback_stale"),
    ],
)  # fmt: skip
def test_slack_refusals(
    timestamp: str | None, signature: str | None, body: bytes, code: str
) -> None:
    with pytest.raises(AegisError) as info:
        verify_slack(SECRET, timestamp=timestamp, signature=signature, body=body, now=NOW)
    assert info.value.code == code


def test_slack_window_edges_are_inclusive() -> None:
    for ts in (str(int(NOW) - SLACK_MAX_AGE), str(int(NOW) + SLACK_MAX_AGE)):
        verify_slack(SECRET, timestamp=ts, signature=sign_v0(SECRET, ts, BODY), body=BODY, now=NOW)


TEAMS_KEY = base64.b64encode(b"k" * 32)


def _teams_auth(body: bytes, key: bytes = TEAMS_KEY) -> str:
    mac = hmac.new(base64.b64decode(key), body, hashlib.sha256).digest()
    return "HMAC " + base64.b64encode(mac).decode()


def test_teams_hmac_verifies() -> None:
    verify_teams(TEAMS_KEY, authorization=_teams_auth(b'{"text":"x"}'), body=b'{"text":"x"}')


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "callback_unsigned"),
        ("Bearer abc", "callback_unsigned"),
        ("HMAC", "callback_unsigned"),
        ("HMAC not*base64", "callback_signature_invalid"),
        (_teams_auth(b'{"text":"y"}'), "callback_signature_invalid"),
        (_teams_auth(b'{"text":"x"}', base64.b64encode(b"o" * 32)), "callback_signature_invalid"),
    ],
)
def test_teams_refusals(authorization: str | None, code: str) -> None:
    with pytest.raises(AegisError) as info:
        verify_teams(TEAMS_KEY, authorization=authorization, body=b'{"text":"x"}')
    assert info.value.code == code
