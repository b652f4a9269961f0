"""Human approvals: what the approval gate costs (SQLite, embedded default).

* ``digest+verify``: the CPU part of a retry with an override (call digest and override token
  verification), per second.
* ``repeat hold``: the same held call asked again while its request is open (the expiry sweep,
  the refused insert and the read of the open request), per second.
* ``full cycle``: a new request, an approval and the redemption of its override (store writes and
  audit records included), per second.

Wall time on a shared machine: every figure is noisy; compare ratios within one run.

    .venv/bin/python bench/bench_approvals.py [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from aegis.approvals import HeldCall, build_approval_service, call_digest
from aegis.config import load_config
from aegis.policy.decision import ApprovalRequirement
from aegis.server.services import build_services

YAML = """issuer: http://127.0.0.1:8080
database: {url: sqlite:///.aegis/aegis.db}
approvals:
  approvers: [{id: carol@example.com, groups: [finance]}]
"""
NEED = ApprovalRequirement(group="finance", channel="none", expires_in=600)


def _call(i: int) -> HeldCall:
    return HeldCall(
        decision_id=f"d{i}", tenant="acme", env="prod", agent_id="payer", agent_owner="o@x",
        tool="payments", method="POST", path="/payments/charge", query=(),
        body_digest=f"sha256:{i:064x}", body={"amount": 12000 + i},
    )  # fmt: skip


async def run(n: int, directory: Path) -> dict[str, float]:
    (directory / ".aegis").mkdir()
    for name in ("kek", "pepper"):
        (directory / ".aegis" / name).write_text(base64.b64encode(os.urandom(32)).decode())
    (directory / "aegis.yaml").write_text(YAML)
    config = load_config(directory / "aegis.yaml", environ={})
    services = build_services(config)
    svc = build_approval_service(
        config, clock=services.clock, keyring=services.keyring, replay=services.replay
    )
    out: dict[str, float] = {}
    first = await svc.hold(_call(-1), NEED)
    approved = await svc.decide(first.id, via="cli", credential="carol@example.com", approve=True)
    token = svc.overrides.mint(approved)
    t0 = time.perf_counter()
    for _ in range(n * 10):
        svc.overrides.verify(token, now=time.time())
        call_digest(_call(-1))
    out["digest+verify"] = n * 10 / (time.perf_counter() - t0)
    open_call = _call(-2)
    await svc.hold(open_call, NEED)
    t0 = time.perf_counter()
    for i in range(n):
        await svc.hold(dataclasses.replace(open_call, decision_id=f"r{i}"), NEED)
    out["repeat hold"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        req = await svc.hold(_call(i), NEED)
        done = await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
        await svc.redeem(_call(i), svc.overrides.mint(done))
    out["full cycle"] = n / (time.perf_counter() - t0)
    svc.close()
    await services.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(run(args.n, Path(tmp)))
    for name, per_second in figures.items():
        print(f"{name:<14} {per_second:10.0f} /s")
    print(
        f"ratio digest+verify / full cycle: {figures['digest+verify'] / figures['full cycle']:.0f}x"
    )


if __name__ == "__main__":
    main()
