"""Pipeline cost in instructions, which a shared machine does not blur: the in-process pipeline
(one token for every call, as bench_gateway.py's "one token" figure) against its raw Ed25519
work (one proof verification and one attestation signature), each counted by valgrind's
callgrind, which counts instructions retired, not time, so two runs give the same figure
whatever else the machine is doing.

Each figure is the difference between two runs that do the same set-up and then N1 or N2
operations, divided by N2 - N1: set-up, imports and interpreter start cancel out. Both sides
verify the same proofs (verification time varies with the signature), so two runs agree to
within the variation of the random keys and proofs each draws.

Needs valgrind (a Debian package); bounded and loopback-free:
    .venv/bin/python bench/bench_icount.py [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARM = 20
N1 = 20  # the smaller run's operations: its set-up, and N1 calls, cancel out


class _StillClock:
    """Wall time as it is, monotonic time still. Under valgrind a call takes about 50 times as
    long, and the registry cache's TTL (0.25 s, monotonic) would lapse every few calls: the
    re-reads a native run never makes (and their hand-overs to reader threads) were counted as
    pipeline work, 9-17 % of it."""

    def __init__(self) -> None:
        import time

        self._time, self._still = time, time.monotonic()

    def now(self) -> float:
        return float(self._time.time())

    def monotonic(self) -> float:
        return self._still


def _inner(mode: str, n: int, setup: int) -> None:
    """``n`` operations after ``WARM``, on ``setup`` contexts built whatever ``n`` (so that set-up
    cancels out between the two runs)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gateway as bg
    from aegis.config import GatewaySettings, load_config
    from aegis.crypto.keys import b64u_decode
    from aegis.gateway.app import build_pipeline
    from aegis.gateway.context import CallContext, body_digest
    from aegis.policy.store import MemoryPolicyStore
    from aegis.server.services import build_services

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(bg.write_dev_config(Path(tmp), 8080), environ={})
        services = build_services(config, clock=_StillClock())
        key, _, token = bg.register(services)
        settings = GatewaySettings.model_validate({"public_url": bg.GW,
                                                   "allow": [{"tool": "payments"}]})  # fmt: skip
        pipe = build_pipeline(services, settings, policy_store=MemoryPolicyStore(), audit=None)
        pipe._audit = None
        body, url = b'{"amount": 5}', bg.GW + "/pay/x"
        ctxs = [
            CallContext(method="POST", url=url, host="gw.bench", path="/pay/x", route=bg.ROUTE,
                        headers=(("authorization", f"DPoP {token}"),
                                 ("dpop", bg.mint_proof(key, "POST", url, token=token)),
                                 ("content-type", "application/json")),
                        body_digest=body_digest(body), body={"amount": 5}, raw_body=body)
            for _ in range(setup)
        ]  # fmt: skip
        # Verification is variable-time in the signature (libsodium's double scalar
        # multiplication): the floor verifies the very proofs the pipeline run verifies, so that
        # both average over the same signatures rather than one against many.
        proofs = [(signed.encode(), b64u_decode(signature))
                  for signed, _, signature in (c.headers[1][1].rpartition(".") for c in ctxs)]  # fmt: skip
        signer = services.keyring.signing_key()

        async def run() -> None:
            for ctx in ctxs[:WARM]:
                assert (await pipe.run(ctx)).allowed
            timed, signatures = ctxs[WARM : WARM + n], proofs[WARM : WARM + n]
            assert len(timed) == len(signatures) == n, "fewer contexts than operations"
            if mode == "pipeline":
                for ctx in timed:
                    assert (await pipe.run(ctx)).allowed
            else:
                for signed, signature in signatures:
                    key.public.verify(signed, signature)
                    signer.sign(signed)

        asyncio.run(run())


def _count(mode: str, n: int, setup: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--inner", mode, str(n), str(setup)],
        capture_output=True, text=True, check=True, timeout=1800,
        # One string hash seed for every run: dict and set layouts, and so instruction counts,
        # vary with it.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    assert found, out.stderr[-2000:]
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--inner", nargs=3, metavar=("MODE", "N", "SETUP"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.inner:
        return _inner(args.inner[0], int(args.inner[1]), int(args.inner[2]))
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    n1, n2 = N1, N1 + args.calls
    setup = WARM + n2
    per = {}
    for mode in ("raw", "pipeline"):
        per[mode] = (_count(mode, n2, setup) - _count(mode, n1, setup)) / (n2 - n1)
    print(f"raw Ed25519 (1 verify + 1 sign)   {per['raw']:>12,.0f} instructions per call")
    print(f"pipeline, one token, no audit    {per['pipeline']:>12,.0f} instructions per call  "
          f"ratio {per['pipeline'] / per['raw']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
