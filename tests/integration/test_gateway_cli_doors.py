"""``aegis gateway run`` as a real process with both ext_authz doors configured: the reverse proxy,
the gRPC ``Authorization/Check`` service and the HTTP ext_authz door all answer from the one
process, each refusing a call without credentials, and one SIGTERM stops all of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2
from tests.support.gateway_process import start_gateway, stop_gateway
from tests.support.server import free_port, write_dev_config

pytestmark = pytest.mark.slow


def test_gateway_run_serves_proxy_and_both_ext_authz_doors(tmp_path: Path) -> None:
    proxy, grpc_port, http_port = free_port(), free_port(), free_port()
    config = write_dev_config(
        tmp_path,
        8080,
        "gateway:\n"
        f"  port: {proxy}\n"
        "  routes:\n"
        "    - {path_prefix: /payments, upstream: 'http://127.0.0.1:9', tool: payments,"
        " tenant: acme, env: prod}\n"
        f"  ext_authz: {{grpc_port: {grpc_port}, http_port: {http_port}}}\n",
    )
    proc = start_gateway(config, {}, tmp_path / "gateway.log", local_stores=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "aegis gateway run exited"
            try:
                healthy = httpx.get(f"http://127.0.0.1:{proxy}/healthz", timeout=0.5)
                if healthy.status_code == 200 and httpx.get(f"http://127.0.0.1:{http_port}/x"):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway was not ready within 20 s"
            time.sleep(0.1)
        through = httpx.post(f"http://127.0.0.1:{proxy}/payments/charge", timeout=5)
        assert (through.status_code, through.json()["code"]) == (401, "unauthenticated")
        door = httpx.post(f"http://127.0.0.1:{http_port}/payments/charge", timeout=5)
        assert (door.status_code, door.json()["code"]) == (401, "unauthenticated")
        http = ac.AttributeContext.HttpRequest(
            method="POST", path="/payments/charge", host="gw", scheme="http", protocol="HTTP/1.1"
        )
        request = pb.CheckRequest(
            attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
        )
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            resp = pb_grpc.AuthorizationStub(channel).Check(request, timeout=5)
        assert resp.status.code == code_pb2.UNAUTHENTICATED
        assert resp.denied_response.status.code == 401
        assert json.loads(resp.denied_response.body)["code"] == "unauthenticated"
    finally:
        stopped = stop_gateway(proc)
    assert stopped, "aegis gateway run did not stop on SIGTERM"
