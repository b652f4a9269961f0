"""Reverse-proxy cost on loopback, each server in its own process: what the gateway adds over calling
the upstream directly, and how many calls per second it forwards on one core.

Three processes, as in a deployment: the upstream (a minimal ASGI app under uvicorn), the gateway
(uvicorn configured and on the event loop as ``aegis gateway run`` has them, pinned to one CPU, the
full pipeline: token and DPoP proof verification, replay, subject, delegation, allow-list policy,
attestation) and the load client. Run in one process, the three would share one GIL and each hop would wait for the
others' switch interval, which measures Python, not the gateway. The gateway process serves three
ports from one event loop: the gateway with the durable audit append (SQLite WAL +
``synchronous=FULL``), the gateway without it, and the same-run floor: a pass-through proxy built
from the same parts (uvicorn, a plain ASGI handler, one pooled aiohttp session) that decides
nothing, so what the decision costs and what the HTTP machinery costs show apart.

Used by bench_gateway.py; alone:  .venv/bin/python bench/bench_proxy.py [--http 400]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.gateway.helpers import mint_proof
from tests.support.server import free_port, write_dev_config

from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.gateway.server import freeze_startup_heap, gateway_server, run_event_loop
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services

BODY = b'{"amount": 5}'
ANSWER = b'{"ok":true,"card":"4111 1111 1111 1111"}'


def _pin(last: bool) -> None:
    """The gateway takes the last CPU; the upstream and the client keep off it."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]} if last else set(cpus[:-1]))


def _server(app: Any, port: int, lifespan: str = "on") -> uvicorn.Server:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, access_log=False
    )
    return uvicorn.Server(config)


async def _serve_until_told(servers: list[uvicorn.Server], conn: Connection) -> None:
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.02)
    conn.send("ready")
    loop = asyncio.get_running_loop()
    # Until told to stop, answer "cpu" with this process's CPU time so far (every thread: the
    # event loop and the audit writer), which a loaded machine inflates far less than wall time.
    while await loop.run_in_executor(None, conn.recv) == "cpu":
        conn.send(time.process_time())
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks)


async def _upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The tool: reads the request body, answers a small JSON document (it is not what is
    measured, and it shares a core with the load client, so it is kept cheap)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(ANSWER)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


def serve_upstream(port: int, conn: Connection) -> None:
    _pin(last=False)
    run_event_loop(_serve_until_told([_server(_upstream_app, port, lifespan="off")], conn))


def passthrough_app(upstream: str) -> Any:
    """The floor: forward every request to ``upstream`` and relay the answer, deciding nothing
    (same server, same client library and pool settings as the gateway's proxy)."""
    session: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                session["s"] = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding"),
                )
                await send({"type": "lifespan.startup.complete"})
            await session["s"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        drop = (b"host", b"content-length", b"authorization", b"dpop")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in drop
        ]
        async with session["s"].request(
            scope["method"], upstream + scope["path"], headers=headers, data=body
        ) as r:
            data = await r.read()
            out = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in r.headers.items()
                if k.lower() not in ("date", "server")
            ]
        await send({"type": "http.response.start", "status": r.status, "headers": out})
        await send({"type": "http.response.body", "body": data})

    return app


def serve_gateway(
    config_path: str, upstream: str, ports: tuple[int, int, int], conn: Connection
) -> None:
    """Port 0 of ``ports`` with the durable audit append, port 1 without it, port 2 the
    pass-through floor."""
    _pin(last=True)
    config = load_config(config_path, environ={})
    services = build_services(config)
    servers = []
    for audited, port in zip((True, False), ports[:2], strict=True):
        settings = GatewaySettings.model_validate({
            "public_url": f"http://127.0.0.1:{port}", "allow": [{"tool": "payments"}],
            "routes": [{"path_prefix": "/pay", "upstream": upstream, "tool": "payments",
                        "tenant": "acme", "env": "prod"}],
        })  # fmt: skip
        pipe = build_pipeline(services, settings, policy_store=MemoryPolicyStore())
        if not audited:
            pipe._audit = None  # the decision and the forward alone
        app = create_gateway_app(services, settings, pipeline=pipe)
        servers.append(gateway_server(app, "127.0.0.1", port, log_level="warning"))
    servers.append(
        gateway_server(passthrough_app(upstream), "127.0.0.1", ports[2], log_level="warning")
    )
    freeze_startup_heap()  # as aegis gateway run does before serving
    run_event_loop(_serve_until_told(servers, conn))


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def _sequential(
    client: httpx.Client, url: str, proofs: list[str] | None, token: str
) -> list[float]:
    samples = []
    for i in range(len(proofs) if proofs else 0):
        headers = {"content-type": "application/json"}
        if proofs is not None and token:
            headers |= {"authorization": f"DPoP {token}", "dpop": proofs[i]}
        t = time.perf_counter()
        r = client.post(url, content=BODY, headers=headers)
        samples.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return samples


async def _burst(url: str, token: str, proofs: list[str]) -> float:
    # aiohttp as the load client: cheaper per request than httpx, so the figure is less about
    # the client (which shares a core with the upstream).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        sem = asyncio.Semaphore(16)

        async def one(p: str) -> None:
            async with sem:
                h = {
                    "authorization": f"DPoP {token}",
                    "dpop": p,
                    "content-type": "application/json",
                }
                async with session.post(url, data=BODY, headers=h) as r:
                    await r.read()
                    assert r.status == 200, r.status

        t = time.perf_counter()
        await asyncio.gather(*(one(p) for p in proofs))
        return len(proofs) / (time.perf_counter() - t)


def proxy_bench(config_path: Path, key: Any, token: str, n: int) -> dict[str, float]:
    """``n`` sequential calls direct, through the audited and the unaudited gateway; then ``n``
    concurrent calls (16 in flight) through the audited gateway for throughput."""
    ctx = mp.get_context("spawn")
    up_port, gw_ports = free_port(), (free_port(), free_port(), free_port())
    upstream = f"http://127.0.0.1:{up_port}"
    pipes = [ctx.Pipe(), ctx.Pipe()]
    procs = [
        ctx.Process(target=serve_upstream, args=(up_port, pipes[0][1]), daemon=True),
        ctx.Process(
            target=serve_gateway,
            args=(str(config_path), upstream, gw_ports, pipes[1][1]),
            daemon=True,
        ),
    ]
    for p in procs:
        p.start()
    _pin(last=False)
    out: dict[str, float] = {}
    try:
        for parent, _ in pipes:
            if not parent.poll(60):
                raise RuntimeError("a bench server did not start")
            parent.recv()
        audited, bare, floor = (f"http://127.0.0.1:{p}/pay/x" for p in gw_ports)
        gateway = pipes[1][0]

        def gateway_cpu() -> float:
            gateway.send("cpu")
            return float(gateway.recv())

        with httpx.Client() as client:
            _sequential(client, upstream + "/pay/x", [""] * 20, "")  # warm both hops
            _sequential(client, audited, [mint_proof(key, "POST", audited, token=token)], token)
            _sequential(client, bare, [mint_proof(key, "POST", bare, token=token)], token)
            _sequential(client, floor, [""] * 20, "")
            # The four targets in interleaved rounds: an added p50 subtracts figures taken over
            # the same minutes, whatever else the machine did meanwhile.
            targets = {"direct": (upstream + "/pay/x", False), "floor": (floor, True),
                       "proxy": (audited, True), "bare": (bare, True)}  # fmt: skip
            samples: dict[str, list[float]] = {name: [] for name in targets}
            cpu = dict.fromkeys(targets, 0.0)
            rounds = 10
            for i in range(rounds):
                m = n // rounds + (1 if i < n % rounds else 0)
                for name, (url, signed) in targets.items():
                    proofs = _proofs(key, url, token, m) if signed else [""] * m
                    before = gateway_cpu()
                    samples[name] += _sequential(client, url, proofs, token if signed else "")
                    cpu[name] += gateway_cpu() - before
        for name in targets:
            out[f"{name}_p50"] = _pct(samples[name], 0.5)
            out[f"{name}_p99"] = _pct(samples[name], 0.99)
        out.update(floor_cpu=cpu["floor"] / n * 1e6, proxy_cpu=cpu["proxy"] / n * 1e6,
                   bare_cpu=cpu["bare"] / n * 1e6)  # fmt: skip
        for name, url in (("proxy", audited), ("bare", bare), ("floor", floor)):
            proofs = _proofs(key, url, token, n)
            before = gateway_cpu()
            rps = asyncio.run(_burst(url, token, proofs))
            used = gateway_cpu() - before
            out[f"{name}_rps"] = rps
            out[f"{name}_burst_cpu"] = used / n * 1e6
            # How busy the gateway's core was: below ~100% the achieved rate was bounded by the
            # client and the upstream on the other core, not by the gateway.
            out[f"{name}_busy"] = used / (n / rps)
    finally:
        for parent, _ in pipes:
            parent.send("stop")
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def _proofs(key: Any, url: str, token: str, n: int) -> list[str]:
    return [mint_proof(key, "POST", url, token=token) for _ in range(n)]


def report(h: dict[str, float]) -> None:
    print(f"direct upstream           p50 {h['direct_p50']:8.1f} us  p99 {h['direct_p99']:8.1f} us")
    print(f"pass-through floor        p50 {h['floor_p50']:8.1f} us  p99 {h['floor_p99']:8.1f} us"
          f"  added p50 {h['floor_p50'] - h['direct_p50']:8.1f} us  (same parts, no decision)")  # fmt: skip
    print(f"through gateway (audited) p50 {h['proxy_p50']:8.1f} us  p99 {h['proxy_p99']:8.1f} us"
          f"  added p50 {h['proxy_p50'] - h['direct_p50']:8.1f} us  (goal <= 1000)")  # fmt: skip
    print(f"through gateway, no audit p50 {h['bare_p50']:8.1f} us  p99 {h['bare_p99']:8.1f} us"
          f"  added p50 {h['bare_p50'] - h['direct_p50']:8.1f} us")  # fmt: skip
    print(f"gateway CPU per proxied call (process CPU of the gateway, all threads):"
          f" sequential audited {h['proxy_cpu']:7.1f} us, sequential no audit {h['bare_cpu']:7.1f}"
          f" us; 16 in flight: audited {h['proxy_burst_cpu']:7.1f} us"
          f" (extrapolated to a saturated core: {1e6 / h['proxy_burst_cpu']:6.0f} req/s),"
          f" no audit {h['bare_burst_cpu']:7.1f} us ({1e6 / h['bare_burst_cpu']:6.0f} req/s)")  # fmt: skip
    print(f"pass-through floor CPU per call: sequential {h['floor_cpu']:7.1f} us, 16 in flight"
          f" {h['floor_burst_cpu']:7.1f} us -> {1e6 / h['floor_burst_cpu']:6.0f} req/s per core;"
          f" the decision's share of the gateway's CPU:"
          f" {1 - h['floor_burst_cpu'] / h['bare_burst_cpu']:4.0%}")  # fmt: skip
    print(f"throughput achieved, gateway process on one core (16 in flight): audited"
          f" {h['proxy_rps']:6.0f} req/s, core {h['proxy_busy']:4.0%} busy (goal >= 2500);"
          f" no audit {h['bare_rps']:6.0f} req/s, {h['bare_busy']:4.0%} busy; pass-through floor"
          f" {h['floor_rps']:6.0f} req/s, {h['floor_busy']:4.0%} busy  (client and upstream share"
          f" the other {max(1, (os.cpu_count() or 2) - 1)} core(s): a core under ~100% busy"
          " was held back by them)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, default=400)
    args = parser.parse_args()
    from bench_gateway import register

    with tempfile.TemporaryDirectory() as tmp:
        config_path = write_dev_config(Path(tmp), 8080)
        services = build_services(load_config(config_path, environ={}))
        key, _, token = register(services)
        report(proxy_bench(config_path, key, token, args.http))


if __name__ == "__main__":
    main()
