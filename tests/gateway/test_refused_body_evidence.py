"""The evidence of a call refused after its body was read names that body: the audit record's
request digest (and the attestation over it) is of the bytes received, never of an empty body
that another request (a bodiless POST) would share."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from aegis.audit.attest import request_digest
from aegis.gateway.context import EMPTY_BODY_DIGEST, STREAMED_BODY_DIGEST, body_digest
from tests.gateway.conftest import Agent, Env, dpop_headers, gateway_app
from tests.gateway.harness import gateway_here
from tests.gateway.test_ext_authz_grpc import (
    check,
    denied,
    stub,  # noqa: F401  (the gRPC door fixture)
)

GRPC_URL = "https://gw.example.com/payments/charge"
ROUTE = {"path_prefix": "/payments", "upstream": "http://127.0.0.1:9", "tool": "payments",
         "tenant": "acme", "env": "prod"}  # fmt: skip


def _record(env: Env, decision_id: str) -> dict[str, Any]:
    return next(r for r in env.audit.records() if r.get("decision_id") == decision_id)


@pytest.mark.parametrize(
    "raw",
    [b'{"amount": 1, "amount": 100000}', b'{"_method": "DELETE", "amount": 1}'],
    ids=["repeated-member", "body-method-override"],
)
async def test_a_body_refused_after_it_was_read_is_attested_as_that_body(
    env: Env, raw: bytes
) -> None:
    agent = Agent(env)
    token = agent.token()
    async with gateway_here(gateway_app(env, [ROUTE])) as port:
        url = f"http://127.0.0.1:{port}/payments/charge"
        headers = {"authorization": f"DPoP {token}", "content-type": "application/json",
                   "dpop": agent.proof(token, "POST", "/payments/charge")}  # fmt: skip
        async with httpx.AsyncClient() as http:
            answer = await http.post(url, content=raw, headers=headers)
    assert answer.status_code == 400, answer.text
    record = _record(env, answer.headers["x-aegis-decision-id"])
    # The fields the upstream receives: those httpx sent but the credentials, Host, framing
    # and hop-by-hop ones, and the gateway's own x-forwarded-*.
    sent = [
        (k.lower(), v)
        for k, v in answer.request.headers.multi_items()
        if k.lower() not in ("authorization", "dpop", "host", "content-length", "connection")
    ]
    own = [("x-forwarded-for", "127.0.0.1"), ("x-forwarded-proto", "http"),
           ("x-forwarded-host", f"127.0.0.1:{port}")]  # fmt: skip
    bound = sorted([*sent, *own], key=lambda pair: pair[0])
    assert record["request_digest"] != request_digest("POST", url, EMPTY_BODY_DIGEST, bound)
    assert record["request_digest"] == request_digest("POST", url, body_digest(raw), bound)


@pytest.mark.parametrize(
    "raw",
    [b'{"amount": 1, "amount": 100000}', b'{"_method": "DELETE", "amount": 1}'],
    ids=["repeated-member", "body-method-override"],
)
async def test_the_grpc_door_attests_a_body_it_read_and_refused_as_that_body(
    env: Env,
    raw: bytes,
    stub: pb_grpc.AuthorizationStub,  # noqa: F811
) -> None:
    agent = Agent(env)
    token = agent.token()
    fields = [*dpop_headers(agent, token), ("content-type", "application/json")]
    status, _, body = denied(await stub.Check(check(fields, body=raw)))
    assert status == 400, body
    record = _record(env, body["decision_id"])
    # The fields the upstream receives: the door's own x-forwarded-* beside the caller's.
    sent = [("content-type", "application/json"), ("x-forwarded-host", "gw.example.com"),
            ("x-forwarded-proto", "https")]  # fmt: skip
    assert record["request_digest"] not in (
        request_digest("POST", GRPC_URL, digest, sent)
        for digest in (STREAMED_BODY_DIGEST, EMPTY_BODY_DIGEST)
    )
    assert record["request_digest"] == request_digest("POST", GRPC_URL, body_digest(raw), sent)
