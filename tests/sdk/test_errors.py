"""Error mapping: every server code has a typed exception, the three wire shapes are read, and
the retry planner retries only what it may (answers built as data, the way the server sends them)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from aegis import sdk
from aegis.errors import CODES, REFUSAL_FIELD, refusal_mark
from aegis.sdk import (
    AccessDeniedError,
    AegisClientError,
    ApprovalDeniedError,
    ApprovalPolicy,
    ApprovalRequiredError,
    ApprovalTimeoutError,
    ClientAuthenticationError,
    DelegationError,
    DpopProofError,
    GrantRefusedError,
    InvalidRequestError,
    RateLimitedError,
    ReplayDetectedError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    TokenExpiredError,
    TokenRejectedError,
    error_class,
)
from aegis.sdk.approvals import ApprovalWait
from aegis.sdk.retry import Attempts, plan
from aegis.sdk.wire import error_from_response

EXPECTED = {
    "invalid_request": InvalidRequestError,
    "invalid_client": ClientAuthenticationError,
    "invalid_scope": GrantRefusedError,
    "invalid_signature": TokenRejectedError,
    "token_expired": TokenExpiredError,
    "replay_detected": ReplayDetectedError,
    "invalid_dpop_proof": DpopProofError,
    "parent_signature_invalid": DelegationError,
    "grant_replayed": DelegationError,
    "access_denied": AccessDeniedError,
    "tenant_mismatch": AccessDeniedError,
    "approval_needed": ApprovalRequiredError,
    "rate_limited": RateLimitedError,
    "replay_store_unavailable": ServiceUnavailableError,
    "cert_revoked": ClientAuthenticationError,
    "server_error": ServerError,
}


def test_every_error_class_is_exported_from_the_package() -> None:
    from aegis.sdk import errors

    assert set(errors.__all__) <= set(sdk.__all__)


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_server_code_maps_to_a_typed_exception(code: str) -> None:
    cls = error_class(code, CODES[code].status)
    assert cls is not AegisClientError
    if CODES[code].status == 503:
        assert cls is ServiceUnavailableError
    if CODES[code].status == 403:
        assert issubclass(cls, AccessDeniedError | DelegationError)
    error = cls("x", code=code, status=CODES[code].status)
    assert error.retryable is CODES[code].retryable


@pytest.mark.parametrize(("code", "cls"), sorted(EXPECTED.items()))
def test_chosen_codes_map_to_their_classes(code: str, cls: type[AegisClientError]) -> None:
    assert error_class(code) is cls


def test_unknown_codes_fall_back_on_status_never_on_success() -> None:
    assert error_class("brand_new_code", 403) is AccessDeniedError
    assert error_class("brand_new_unavailable", 503) is ServiceUnavailableError
    assert error_class("brand_new_code", 418) is ServerError


def _resp(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


def test_gateway_body_gives_code_and_decision_id() -> None:
    resp = _resp(
        403,
        {"error": "access_denied", "error_description": "no", "code": "access_denied",
         "decision_id": "d1"},
        **{"x-aegis-decision-id": "d1"},
    )  # fmt: skip
    err = error_from_response(resp)
    assert (type(err), err.code, err.decision_id, err.status) == (
        AccessDeniedError,
        "access_denied",
        "d1",
        403,
    )


def test_token_exchange_description_carries_the_aegis_code() -> None:
    body = {"error": "invalid_request", "error_description": "grant reused (grant_replayed)"}
    err = error_from_response(_resp(400, body))
    assert (type(err), err.code, err.decision_id) == (DelegationError, "grant_replayed", None)


def test_admin_body_and_unreadable_bodies() -> None:
    err = error_from_response(_resp(401, {"code": "unauthenticated", "message": "bad key"}))
    assert (type(err), err.message) == (ClientAuthenticationError, "bad key")
    err = error_from_response(httpx.Response(502, content=b"<html>"))
    assert (type(err), err.code) == (ServerError, "server_error")


#: The credentials the planned request was sent with, and the gateway's mark for them.
SENT = "DPoP eyJ.token.sig"


def _refusal(status: int, code: str, *, marked: bool = True, **extra: Any) -> httpx.Response:
    """A gateway refusal of a request sent with :data:`SENT` (``marked``: with the gateway's
    mark for those credentials, as only the gateway can write it)."""
    body = {"error": code, "error_description": code, "code": code, "decision_id": "d", **extra}
    headers = {"x-aegis-decision-id": "d", **extra.pop("headers", {})}
    if marked:
        headers[REFUSAL_FIELD] = refusal_mark(SENT)
    response = _resp(status, {k: v for k, v in body.items() if k != "headers"}, **headers)
    response.request = httpx.Request(
        "POST", "https://gw.example/pay", headers={"authorization": SENT}
    )
    return response


@pytest.mark.parametrize("mark", [None, "forged", refusal_mark("DPoP another.token.sig")])
def test_an_answer_without_the_gateways_mark_for_the_sent_credentials_is_never_retried(
    mark: str | None,
) -> None:
    """A tool knows the decision id of a call that reached it, never the agent's credentials:
    an Aegis-shaped answer without the gateway's mark for them (or with another request's) is
    the tool's, passed on as it came; retrying it would send a POST the tool acted on again."""
    for status, code in ((503, "replay_store_unavailable"), (401, "token_expired"),
                         (401, "use_dpop_nonce"), (403, "approval_needed")):  # fmt: skip
        headers = {} if mark is None else {REFUSAL_FIELD: mark}
        resp = _refusal(status, code, marked=False, headers=headers)
        assert _plan(resp, Attempts()) == "done"


def _plan(resp: httpx.Response, attempts: Attempts, **kw: Any) -> str:
    return plan(
        resp, attempts, kw.pop("policy", RetryPolicy()), approvals=True, raise_for_denial=True, **kw
    ).kind


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "invalid_signature"), (401, "replay_detected"), (403, "access_denied"),
     (403, "parent_signature_invalid"), (401, "token_revoked"), (403, "agent_inactive"),
     (401, "invalid_dpop_proof"), (403, "approval_needed")],
)  # fmt: skip
def test_security_denials_are_raised_at_once(status: int, code: str) -> None:
    assert _plan(_refusal(status, code), Attempts()) == "raise"


def test_an_expired_token_is_refreshed_only_once() -> None:
    attempts = Attempts()
    assert _plan(_refusal(401, "token_expired"), attempts) == "refresh"
    assert _plan(_refusal(401, "token_expired"), attempts) == "raise"


def test_a_nonce_is_taken_once_and_only_with_a_nonce_header() -> None:
    assert _plan(_refusal(401, "use_dpop_nonce"), Attempts()) == "raise"
    attempts = Attempts()
    with_nonce = _refusal(401, "use_dpop_nonce", headers={"dpop-nonce": "n1"})
    assert _plan(with_nonce, attempts) == "nonce"
    assert _plan(with_nonce, attempts) == "raise"


def test_unavailable_is_retried_a_bounded_number_of_times() -> None:
    attempts = Attempts()
    policy = RetryPolicy(unavailable_attempts=3)
    kinds = [_plan(_refusal(503, "audit_unavailable"), attempts, policy=policy) for _ in range(5)]
    assert kinds == ["backoff", "backoff", "backoff", "raise", "raise"]
    assert RetryPolicy(backoff_base=0.1, backoff_max=1).delay(5, "30") == 1


def test_an_upstream_error_without_decision_is_returned() -> None:
    assert _plan(_resp(403, {"code": "access_denied"}), Attempts()) == "done"


def test_approval_is_waited_for_once_when_the_gateway_names_it() -> None:
    attempts = Attempts()
    needed = _refusal(403, "approval_needed", approval_id="a1", status_url="/v1/approvals/a1")
    assert _plan(needed, attempts) == "approval"
    assert _plan(needed, attempts) == "raise"  # the override did not help: never a second wait


def test_approval_wait_backs_off_and_reads_the_status() -> None:
    refusal = ApprovalRequiredError(
        "needs approval", code="approval_needed", status=403, decision_id="d",
        details={"approval_id": "a1", "status_url": "/s"},
    )  # fmt: skip
    policy = ApprovalPolicy(timeout=2, poll_initial=0.5, poll_max=1)
    wait = ApprovalWait(policy, refusal, now=0, control_plane="https://aegis.example")
    assert wait.status_url == "https://aegis.example/s"
    assert [wait.next_delay(0), wait.next_delay(0.5), wait.next_delay(1.5)] == [0.5, 1, 0.5]
    with pytest.raises(ApprovalTimeoutError):
        wait.next_delay(2)
    assert wait.interpret(200, {"state": "pending"}) is None
    assert wait.interpret(200, {"state": "approved", "override_token": "o"}) == "o"
    for status, body in ((200, {"state": "denied"}), (200, {"state": "expired"}),
                         (200, {"state": "used"}), (200, {"state": "approved"}), (404, {})):  # fmt: skip
        with pytest.raises(ApprovalDeniedError) as err:
            wait.interpret(status, body)
        assert err.value.decision_id == "d"
        assert err.value.approval_id == "a1"


@pytest.mark.parametrize(
    "status_url",
    ["https://evil.example/approvals/a1", "http://aegis.example/approvals/a1",
     "https://aegis.example:8443/approvals/a1", "//evil.example/a1", "javascript:alert(1)",
     "https://aegis.example.evil.example/a1"],
)  # fmt: skip
def test_a_status_url_off_the_control_plane_is_never_polled(status_url: str) -> None:
    """A refusal body can be forged by anything on the path (a tool behind the gateway sees the
    decision id); the poll carries the agent's token, so it goes to the control plane only."""
    refusal = ApprovalRequiredError(
        "needs approval", code="approval_needed", status=403, decision_id="d",
        details={"approval_id": "a1", "status_url": status_url},
    )  # fmt: skip
    with pytest.raises(ApprovalRequiredError) as err:
        ApprovalWait(ApprovalPolicy(), refusal, now=0, control_plane="https://aegis.example")
    assert "not polled" in err.value.message
    assert err.value.decision_id == "d"


def test_other_status_origins_can_be_trusted_explicitly() -> None:
    refusal = ApprovalRequiredError(
        "needs approval", code="approval_needed", status=403,
        details={"approval_id": "a1", "status_url": "https://approvals.example:443/a1"},
    )  # fmt: skip
    policy = ApprovalPolicy(status_origins=("https://approvals.example",))
    wait = ApprovalWait(policy, refusal, now=0, control_plane="https://aegis.example")
    assert wait.status_url == "https://approvals.example:443/a1"
