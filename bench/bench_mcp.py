"""What an MCP route adds to a call: reading its JSON-RPC message (``mcp_call``: the strict JSON
parse, the tool name, the argument and routing-field checks) and holding its session in the
replay store, against the same pipeline deciding the same call on a plain route, in one run.

Both sides decide a ``tools/call`` with a DPoP proof under a one-token agent (the proof's
verification and the attestation's signature are the floor both share), in interleaved slices so
that both see the same machine. The MCP side also reads the message from its raw bytes, as the
reverse proxy does, and names a session (held in the in-memory store).

Bounded, in process, no network:  .venv/bin/python bench/bench_mcp.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.gateway.helpers import mint_proof
from tests.support.server import write_dev_config

from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import build_pipeline
from aegis.gateway.context import CallContext, body_digest
from aegis.gateway.fields import parse_json_body
from aegis.gateway.mcp import mcp_call
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services
from bench_gateway import GW, ROUTE, register

MCP_ROUTE = dataclasses.replace(ROUTE, mcp=True)
MESSAGE = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": "transfer", "arguments": {"amount": 5, "to": "acct-1"}}}  # fmt: skip
RAW = json.dumps(MESSAGE).encode()
FIELDS = (
    ("content-type", "application/json"),
    ("mcp-session-id", "5f1d2c3b4a5968778695a4b3c2d1e0f9"),
)


async def _slices(n: int, slice_size: int) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        services = build_services(load_config(write_dev_config(Path(tmp), 8080), environ={}))
        key, _, token = register(services)
        settings = GatewaySettings.model_validate(
            {"public_url": GW, "allow": [{"tool": "payments"}, {"tool": "payments.transfer"}]}
        )
        pipe = build_pipeline(services, settings, policy_store=MemoryPolicyStore(), audit=None)
        pipe._audit = None  # the decision alone, as bench_gateway's figures

        def headers() -> tuple[tuple[str, str], ...]:
            proof = mint_proof(key, "POST", GW + "/pay/x", token=token)
            return (("authorization", f"DPoP {token}"), ("dpop", proof), *FIELDS)

        def ctx(route: object, fields: tuple[tuple[str, str], ...], body: object) -> CallContext:
            return CallContext(method="POST", url=GW + "/pay/x", host="gw.bench", path="/pay/x",
                               route=route, headers=fields, body_digest=body_digest(RAW),  # type: ignore[arg-type]
                               body=body, raw_body=RAW)  # fmt: skip

        # Each side parses the body as the proxy does: a plain route with parse_json_body, an
        # MCP route once, in mcp_call, whose parse the proxy then shows policy.
        def plain_body() -> object:
            return parse_json_body(RAW, "application/json")

        plain_fields = [headers() for _ in range(n + 20)]
        mcp_fields = [headers() for _ in range(n + 20)]
        for f in plain_fields[:10]:  # warm both paths
            assert (await pipe.run(ctx(ROUTE, f, plain_body()))).allowed
        for f in mcp_fields[:10]:
            route, message = mcp_call(MCP_ROUTE, "POST", f, RAW)
            assert message is not None
            assert (await pipe.run(ctx(route, f, message.body))).allowed
        plain, mcp = [], []
        for start in range(20, n + 20, slice_size):
            for f in plain_fields[start : start + slice_size]:
                t = time.perf_counter()
                result = await pipe.run(ctx(ROUTE, f, plain_body()))
                plain.append(time.perf_counter() - t)
                assert result.allowed
            for f in mcp_fields[start : start + slice_size]:
                t = time.perf_counter()
                route, message = mcp_call(MCP_ROUTE, "POST", f, RAW)
                assert message is not None
                result = await pipe.run(ctx(route, f, message.body))
                mcp.append(time.perf_counter() - t)
                assert result.allowed
                assert route.tool == "payments.transfer"
        return plain, mcp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    plain, mcp = asyncio.run(_slices(args.calls, 100))

    def us(samples: list[float], q: float) -> float:
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    p50, m50 = statistics.median(plain) * 1e6, statistics.median(mcp) * 1e6
    print(f"plain route, tools/call body      p50 {p50:8.1f} us   p99 {us(plain, 0.99):8.1f} us")
    print(f"MCP route (read + session hold)   p50 {m50:8.1f} us   p99 {us(mcp, 0.99):8.1f} us")
    print(f"MCP adds {m50 - p50:+.1f} us at p50: ratio {m50 / p50:.2f} ({args.calls} calls each)")


if __name__ == "__main__":
    main()
