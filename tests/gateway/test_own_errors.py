"""The gateway's own failures (a bug while handling a call) are answered 500 server_error at
every door as every refusal is: audited (``gateway.refused``), counted, with a decision id and
the gateway's mark for the credentials sent, never an unrecorded answer an SDK would take for a
tool's."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from aegis.config import GatewaySettings
from aegis.errors import REFUSAL_FIELD, refusal_mark
from aegis.gateway.ext_authz import ExtAuthz
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from tests.gateway.conftest import Agent, Env, gateway_app
from tests.gateway.harness import gateway_here
from tests.gateway.test_ext_authz_grpc import check, denied
from tests.gateway.test_mcp import stub  # noqa: F401  (the gRPC door fixture)

ROUTE = {"path_prefix": "/payments", "upstream": "http://127.0.0.1:9", "tool": "payments",
         "tenant": "acme", "env": "prod"}  # fmt: skip


async def _bug(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug")


def _refused(env: Env, decision_id: str) -> dict[str, Any]:
    (record,) = [r for r in env.audit.records(kind="gateway.refused")
                 if r["decision_id"] == decision_id]  # fmt: skip
    return record


async def test_the_proxys_own_500_is_audited_and_marked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aegis.gateway.proxy import ReverseProxy

    monkeypatch.setattr(ReverseProxy, "_forward", _bug)
    agent = Agent(env)
    token = agent.token()
    headers = {"authorization": f"DPoP {token}", "dpop": agent.proof(token)}
    async with gateway_here(gateway_app(env, [ROUTE])) as port, httpx.AsyncClient() as http:
        answer = await http.post(
            f"http://127.0.0.1:{port}/payments/charge", json={"amount": 1}, headers=headers
        )
    assert answer.status_code == 500 and answer.json()["code"] == "server_error"
    assert answer.headers[REFUSAL_FIELD] == refusal_mark(f"DPoP {token}")
    assert answer.headers["cache-control"] == "no-store"
    decision = answer.headers["x-aegis-decision-id"]
    assert answer.json()["decision_id"] == decision
    assert _refused(env, decision)["status"] == 500


async def test_the_http_doors_own_500_is_audited_and_marked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ExtAuthz, "check", _bug)
    data = env.settings.model_dump()
    data.update(routes=[ROUTE], ext_authz={"http_mode": "envoy", "path_prefix": "/check"})
    settings = GatewaySettings.model_validate(data)
    app = create_ext_authz_http_app(ExtAuthz(env.pipeline, settings), settings.ext_authz)
    headers = {"authorization": "DPoP some.token.value"}
    async with gateway_here(app) as port, httpx.AsyncClient() as http:
        answer = await http.post(f"http://127.0.0.1:{port}/check/payments/charge", headers=headers)
    assert answer.status_code == 500
    assert answer.headers[REFUSAL_FIELD] == refusal_mark("DPoP some.token.value")
    assert _refused(env, answer.headers["x-aegis-decision-id"])["code"] == "server_error"


@pytest.mark.parametrize("raw", [False, True], ids=["headers", "header_map"])
async def test_the_grpc_doors_own_500_is_audited_and_marked(
    env: Env,
    stub: pb_grpc.AuthorizationStub,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    raw: bool,
) -> None:
    monkeypatch.setattr(ExtAuthz, "check", _bug)
    # With Envoy's encode_raw_headers (the docs ask for it) the fields come in header_map.
    answer = await stub.Check(check({"authorization": "DPoP some.token.value"}, raw_map=raw))
    status, headers, body = denied(answer)
    assert (status, body["code"]) == (500, "server_error")
    assert headers[REFUSAL_FIELD] == refusal_mark("DPoP some.token.value")
    assert body["decision_id"] == headers["x-aegis-decision-id"]
    assert _refused(env, body["decision_id"])["door"] == "ext_authz"
