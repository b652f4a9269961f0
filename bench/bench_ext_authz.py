"""gRPC ext_authz cost: ``Authorization/Check`` latency at a paced 1,000 requests/s on one core.

The server is a separate process pinned to one CPU (``sched_setaffinity``), built from the same
configuration as the client side (same key ring, same SQLite registry), serving Envoy's
``envoy.service.auth.v3.Authorization`` with the full pipeline: token and DPoP proof verification,
replay, subject, delegation, allow-list policy, attestation and (unless ``--no-audit``) the durable
audit append. The client sends pre-built ``CheckRequest``s built from Envoy's protos, each with a
fresh DPoP proof, open-loop at ``--rate`` per second for ``--seconds``: a call is started on
schedule whether or not earlier ones returned, so queueing shows in the latency. Each latency is
counted from the moment its call was due, not from when the client got to send it (the client's
own lag is printed too), and a call that failed counts as the timeout.

The stores are the embedded defaults (memory replay and revocation): a gateway scaled out over
Redis adds two round trips to it per call (the proof's jti and the revocation check).

Same-run baselines: the in-process pipeline p50/p99 (no gRPC, no network) on the same keys, the
sum of the raw Ed25519 operations of a call whose token was verified before (the proof's
verification and the attestation's signature), and the gRPC floor: a servicer
on the same server stack, in the same process, that answers OK without deciding anything, paced
the same way (what grpc.aio itself costs per Check on this machine).

With ``--audit-pg URL`` the audit log is a scratch database on that PostgreSQL server (created and
dropped by the run), as gateways scaled out over several processes keep it: the commit's disk work
is then the database server's, not the gateway process's.

Bounded and loopback only:  .venv/bin/python bench/bench_ext_authz.py [--rate 1000] [--seconds 3]
    [--no-audit] [--audit-pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2, status_pb2
from tests.gateway.helpers import mint_proof
from tests.support.server import write_dev_config

from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import build_pipeline
from aegis.gateway.ext_authz import ExtAuthz, TrustedPeers
from aegis.gateway.ext_authz_grpc import AuthorizationService, start_grpc_server
from aegis.gateway.server import freeze_startup_heap, run_event_loop
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services
from bench_audit import drop_pg_database, scratch_pg_database
from bench_gateway import pct, pipeline_bench, raw_ed25519, register

GW = "https://gw.bench"
SETTINGS = {
    "public_url": GW,
    "allow": [{"tool": "payments"}],
    "routes": [{"path_prefix": "/pay", "upstream": "http://127.0.0.1:9", "tool": "payments",
                "tenant": "acme", "env": "prod"}],
}  # fmt: skip


def serve(config_path: str, audit: bool, conn: Connection, audit_url: str | None = None) -> None:
    """The server process: one core, the event loop ``aegis gateway run`` uses, the full
    pipeline behind gRPC."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

    async def main() -> None:
        config = load_config(config_path, environ={})
        services = build_services(config)
        settings = GatewaySettings.model_validate(SETTINGS)
        url = audit_url or config.database_url()
        log = AuditLog(url, clock=services.clock) if audit else None
        pipe = build_pipeline(services, settings, policy_store=MemoryPolicyStore(), audit=log)
        if log is None:
            pipe._audit = None  # the decision alone
        service = AuthorizationService(ExtAuthz(pipe, settings), TrustedPeers([]))
        server, port = await start_grpc_server(service, "127.0.0.1", 0)
        floor, floor_port = await start_grpc_server(FloorService(), "127.0.0.1", 0)  # type: ignore[arg-type]
        freeze_startup_heap()  # as aegis gateway run does before serving
        conn.send((port, floor_port))
        loop = asyncio.get_running_loop()
        # Until told to stop, answer "cpu" with this process's CPU time so far (all threads).
        while await loop.run_in_executor(None, conn.recv) == "cpu":
            conn.send(time.process_time())
        await server.stop(grace=None)
        await floor.stop(grace=None)

    run_event_loop(main())


class FloorService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The floor: every Check answered OK at once, nothing decided."""

    async def Check(self, request: pb.CheckRequest, context: object) -> pb.CheckResponse:
        return pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


def request(key: object, token: str) -> pb.CheckRequest:
    http = ac.AttributeContext.HttpRequest(
        method="POST", path="/pay/x", host="gw.bench", scheme="https", protocol="HTTP/1.1",
        headers={"authorization": f"DPoP {token}",
                 "dpop": mint_proof(key, "POST", GW + "/pay/x", token=token)},  # type: ignore[arg-type]
    )  # fmt: skip
    return pb.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


#: How long a Check may take; one that fails counts as taking this long (or more).
TIMEOUT: Final = 2.0


@dataclass
class Paced:
    """One paced run: each call's latency from the moment it was due (a call the client sent
    late waited that long too: measuring from its start would leave out the client's own lag,
    coordinated omission), how late the client sent calls, the rate achieved, and the calls that
    failed, counted in the latencies as the timeout."""

    samples: list[float]
    lateness: list[float]
    achieved: float
    failures: dict[str, int]


async def paced(port: int, requests: list[pb.CheckRequest], rate: float) -> Paced:
    failures: dict[str, int] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AuthorizationStub(channel)
        for r in requests[:50]:  # warm the channel and the server's caches
            await stub.Check(r)
        samples: list[float] = []
        lateness: list[float] = []

        async def one(r: pb.CheckRequest, due: float) -> None:
            lateness.append(time.perf_counter() - due)
            try:
                resp = await stub.Check(r, timeout=TIMEOUT)
            except grpc.aio.AioRpcError as exc:  # overload shows as errors, counted not hidden
                failures[exc.code().name] = failures.get(exc.code().name, 0) + 1
                samples.append(max(TIMEOUT, time.perf_counter() - due))
                return
            samples.append(time.perf_counter() - due)
            assert resp.status.code == code_pb2.OK, resp

        start = time.perf_counter()
        tasks = []
        for i, r in enumerate(requests[50:]):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(r, due)))
        await asyncio.gather(*tasks)
        achieved = len(tasks) / (time.perf_counter() - start)
    return Paced(samples, lateness, achieved, failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-audit", action="store_true", help="leave out the audit commit")
    parser.add_argument("--audit-pg", metavar="URL", help="append the audit log to a scratch "
                        "database on this PostgreSQL server (postgresql+psycopg://...), as "
                        "scaled-out gateways do, instead of the local SQLite file")  # fmt: skip
    args = parser.parse_args()
    n = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = write_dev_config(Path(tmp), 8080)
        config = load_config(config_path, environ={})
        services = build_services(config)
        key, _, token = register(services)
        # The Check calls below carry one access token, verified once: their Ed25519 work is
        # the proof's verification and the attestation's signature.
        raw = raw_ed25519(services, key, token, 1000, token_check=False) * 1e6
        bare = asyncio.run(pipeline_bench(services, key, token, 1000, None))
        requests = [request(key, token) for _ in range(n + 50)]
        parent, child = mp.Pipe()
        scratch = scratch_pg_database(args.audit_pg) if args.audit_pg else None
        proc = mp.get_context("spawn").Process(
            target=serve, args=(str(config_path), not args.no_audit, child, scratch), daemon=True
        )
        proc.start()
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) > 1:
            os.sched_setaffinity(0, set(cpus[:-1]))  # the client keeps off the server's core
        try:
            port, floor_port = parent.recv()
            parent.send("cpu")
            cpu0 = parent.recv()
            floor = asyncio.run(paced(floor_port, requests, args.rate))
            parent.send("cpu")
            cpu1 = parent.recv()
            check = asyncio.run(paced(port, requests, args.rate))
            parent.send("cpu")
            server_cpu = (parent.recv() - cpu1) / len(requests) * 1e6
            floor_cpu = (cpu1 - cpu0) / len(requests) * 1e6
        finally:
            parent.send("stop")
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            if scratch is not None:
                drop_pg_database(args.audit_pg, scratch)
        store = "PostgreSQL" if scratch else "SQLite"
        audit = "without audit" if args.no_audit else f"with audit (one {store} commit per group)"
        p50 = pct(bare, 0.5)
        print(f"raw Ed25519 (1 verify + 1 sign: proof, attestation), median {raw:8.1f} us")
        print(f"pipeline in process, no audit  p50 {p50:8.1f} us  p99 {pct(bare, .99):8.1f} us"
              f"  ratio {p50 / raw:.2f}  (one access token for every call, as the Check calls"
              " below)")  # fmt: skip
        print("latencies from the moment each call was due (the client's own lag included)")
        for name, run, cpu in (("gRPC floor (OK, nothing decided)", floor, floor_cpu),
                               (f"gRPC Check, server on one core, {audit}", check, server_cpu)):  # fmt: skip
            print(f"{name} at {args.rate:.0f}/s for {args.seconds:g} s "
                  f"(achieved {run.achieved:.0f}/s)")  # fmt: skip
            print(f"  p50 {pct(run.samples, .5):8.1f} us  p99 {pct(run.samples, .99):8.1f} us"
                  f"  max {max(run.samples) * 1e6:8.1f} us"
                  + ("  goal p99 <= 3000 us" if run is check else ""))  # fmt: skip
            print(f"  client lateness p50 {pct(run.lateness, .5):8.1f} us"
                  f"  p99 {pct(run.lateness, .99):8.1f} us")  # fmt: skip
            print(f"  server CPU per Check (process CPU, all threads) {cpu:8.1f} us"
                  f"  -> {1e6 / cpu:6.0f} Check/s per fully available core")  # fmt: skip
            if run.failures:
                print(f"  failed calls, counted in the latencies as {TIMEOUT:g} s: "
                      f"{run.failures} of {len(run.samples)}")  # fmt: skip


if __name__ == "__main__":
    main()
