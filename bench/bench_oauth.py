"""Client-credential grants per second per core over HTTP, against the same server's HTTP floor.

The control plane runs in one uvicorn process pinned to one core (SQLite + memory stores, as
`aegis up` does); the load generator (aiohttp, keep-alive, 32 concurrent requests) runs on the other
core. Baseline measured in the same run: `GET /healthz` on the same server, i.e. what the HTTP stack
alone can do. For reference, a widely used OAuth server documents ~120 grants/s per vCPU.

    .venv/bin/python bench/bench_oauth.py [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from aegis.config import load_config
from aegis.registry.service import AgentSpec
from aegis.server.services import build_services
from aegis.types import ClientAuthMethod

ROOT = Path(__file__).resolve().parent.parent


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


async def _load(
    url: str,
    seconds: float,
    concurrency: int,
    method: str,
    data: dict[str, str] | None,
    headers: dict[str, str] | None,
) -> tuple[int, int, list[float]]:
    ok = bad = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal ok, bad
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.request(method, url, data=data, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        bad += 1
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, bad, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / ".aegis").mkdir()
        for name in ("kek", "pepper"):
            (d / ".aegis" / name).write_text(base64.b64encode(os.urandom(32)).decode())
        port = 18080 + os.getpid() % 1000
        (d / "aegis.yaml").write_text(
            f"issuer: http://127.0.0.1:{port}\nlogging:\n  level: error\n"
            "oauth:\n  auth_failure_limit: 1000000\n"
        )
        services = build_services(load_config(d / "aegis.yaml", environ={}))
        services.registry.register_agent(
            AgentSpec(
                "bench-agent", "acme", "prod", "ops@example.com", allowed_scopes=("tools:call",)
            ),
            actor="bench",
        )
        client, secret = services.registry.create_client(
            "bench-agent", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="bench"
        )
        asyncio.run(services.aclose())
        env = {**os.environ, "AEGIS_CONFIG": str(d / "aegis.yaml")}
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os; os.sched_setaffinity(0, {0}) if hasattr(os, 'sched_setaffinity') else None;"
                "import uvicorn; uvicorn.run('aegis.server.app:app_from_config', factory=True, "
                f"host='127.0.0.1', port={port}, log_level='error', access_log=False)",
            ],
            cwd=d,
            env=env,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            _pin(1)
            basic = base64.b64encode(f"{client.client_id}:{secret}".encode()).decode()
            auth = {"Authorization": f"Basic {basic}"}
            form = {"grant_type": "client_credentials", "scope": "tools:call"}
            asyncio.run(
                _load(f"{base}/oauth/token", 1.0, args.concurrency, "POST", form, auth)
            )  # warm-up
            floor_ok, _, _ = asyncio.run(
                _load(f"{base}/healthz", args.seconds, args.concurrency, "GET", None, None)
            )
            ok, bad, lat = asyncio.run(
                _load(f"{base}/oauth/token", args.seconds, args.concurrency, "POST", form, auth)
            )
        finally:
            server.terminate()
            server.wait(timeout=10)
    lat.sort()
    grants = ok / args.seconds
    floor = floor_ok / args.seconds
    print(f"client_credentials grants/s (1 server core): {grants:,.0f}  (non-200: {bad})")
    print(
        f"  latency p50 {lat[len(lat) // 2] * 1e3:.2f} ms  p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms"
    )
    print(f"HTTP floor, GET /healthz req/s (same server):  {floor:,.0f}")
    print(f"ratio grants / HTTP floor: {grants / floor:.2f}")
    print(
        f"goal >= 1,000 grants/s per core: {'met' if grants >= 1000 else 'NOT met'}; "
        f"reference ~120/s per vCPU for a widely used OAuth server: {grants / 120:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
