"""Delegation chain verification cost per extra hop, against raw Ed25519 verifies in the same run.

``verify_chain`` re-verifies every link of a token's ``parent_agent`` chain (one Ed25519 signature
per link, plus registry lookups from the in-process cache and the narrowing checks). The goal is a
cost linear in the number of hops and at most 1.2 raw Ed25519 verifies per extra hop. The baseline
is libsodium's verify of a message of the same size as one link's signing input, timed in this run.

Two figures per chain length: *cold*, every link's signature checked (the memo of verified links is
emptied before each call: a chain the gateway has never seen), and *warm*, the usual case of a
token called with many times (each link's signature result is memoized per exact link and signer
key material; time, agent state and narrowing are still checked on every call).

    .venv/bin/python bench/bench_delegation.py [--rounds 2000] [--cpu [--batches 300]]

``--cpu`` times with this process's CPU time instead of the wall clock, over many short
interleaved batches (20 calls each), keeping the fastest: on a shared, loaded machine the wall
clock mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from aegis.clock import SystemClock
from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import NotFound
from aegis.registry.cache import RegistryCache
from aegis.tokens.chain import ChainRules, verify_chain
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import CHAIN_SEPARATOR, forget_verified_links, mint_grant
from aegis.tokens.exchange import nested_act
from aegis.types import Agent, AgentStatus

ISSUER = "https://aegis.example"
SCOPES = ("payments:read", "payments:write")


class _Agents:
    """Just enough of a RegistryStore for the cache: agents by id."""

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}

    def get_agent(self, agent_id: str) -> Agent:
        try:
            return self.agents[agent_id]
        except KeyError:
            raise NotFound(agent_id) from None


def _token(hops: int, store: _Agents, now: float) -> AccessToken:
    keys = [Ed25519SigningKey.generate() for _ in range(hops + 1)]
    names = [f"h{hops}-agent-{i}" for i in range(hops + 1)]
    for name, key in zip(names, keys, strict=True):
        store.agents[name] = Agent(
            id=name, tenant_id="acme", env="prod", display_name=name, owner="o@example.com",
            status=AgentStatus.ACTIVE, created_at=0.0, updated_at=0.0, allowed_scopes=SCOPES,
            jwks=(key.public.to_jwk(),),
        )  # fmt: skip
    links: list[str] = []
    for i in range(hops):
        links.append(
            mint_grant(
                keys[i], parent=names[i], child=names[i + 1], audience=ISSUER, scopes=SCOPES,
                tools=("pay_invoice",), max_depth=8 - i, parent_links=links, now=now,
            )
        )  # fmt: skip
    claims = {
        "iss": ISSUER, "sub": names[-1], "agent_id": names[-1], "client_id": f"{names[-1]}.c",
        "aud": "aegis-gateway", "iat": int(now), "exp": int(now) + 300, "jti": "j",
        "tenant": "acme", "env": "prod", "scope": " ".join(SCOPES), "act": nested_act(names),
        "parent_agent": CHAIN_SEPARATOR.join(links), "delegation_depth": hops,
    }  # fmt: skip
    return AccessToken.from_claims(claims)


def _measure(
    fns: dict[int, Callable[[], object]],
    rounds: int,
    *,
    batches: int = 7,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Microseconds per call: the fastest of ``batches`` batches of ``rounds`` calls, batches of
    all cases interleaved so that load from other processes falls on every case alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(batches):
        for k, fn in fns.items():
            t0 = timer()
            for _ in range(rounds):
                fn()
            best[k] = min(best[k], (timer() - t0) / rounds * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--cpu", action="store_true", help="time with CPU time, short batches")
    ap.add_argument("--batches", type=int, default=300, help="batches of 20 calls with --cpu")
    args = ap.parse_args()
    clock = SystemClock()
    store = _Agents()
    cache = RegistryCache(store, clock=clock, ttl=0.25)  # type: ignore[arg-type]
    rules = ChainRules(issuer=ISSUER, service_keys=lambda kid, **_: None, max_depth=4)
    now = clock.now()
    tokens = {hops: _token(hops, store, now) for hops in range(1, 5)}

    link = tokens[1].claims["parent_agent"]
    jws = parse_compact(link)
    signer = Ed25519SigningKey.generate()
    signature = signer.sign(jws.signing_input)
    fns: dict[int, Callable[[], object]] = {
        0: lambda: signer.public.verify(jws.signing_input, signature)
    }
    for hops, tok in tokens.items():
        fns[hops] = lambda t=tok: verify_chain(t, cache=cache, rules=rules, now=clock.now())
        fns[-hops] = lambda t=tok: (
            forget_verified_links(),
            verify_chain(t, cache=cache, rules=rules, now=clock.now()),
        )
    if args.cpu:
        cost = _measure(fns, 20, batches=args.batches, timer=time.process_time)
    else:
        cost = _measure(fns, args.rounds)
    print(f"clock: {'CPU time, ' if args.cpu else 'wall, '}fastest batch per case")
    raw = cost.pop(0)
    print(f"raw Ed25519 verify ({len(jws.signing_input)}-byte input): {raw:8.1f} us")
    verdicts = []
    for label, sign in (("cold", -1), ("warm", 1)):
        by_hops = {h: cost[sign * h] for h in range(1, 5)}
        previous = None
        for hops, us in by_hops.items():
            step = "" if previous is None else f"   +{us - previous:6.1f} us for this hop"
            print(
                f"{label} verify_chain, {hops} hop(s): {us:8.1f} us"
                f"  = {us / raw:4.2f} raw verifies{step}"
            )
            previous = us
        per_hop = (by_hops[4] - by_hops[1]) / 3
        steps = [by_hops[h] - by_hops[h - 1] for h in (2, 3, 4)]
        print(
            f"{label} cost per extra hop (1 -> 4 hops): {per_hop:6.1f} us"
            f" = {per_hop / raw:4.2f} raw verifies"
        )
        spread = max(steps) / min(steps) if min(steps) > 0 else float("inf")
        print(f"  per-hop steps {', '.join(f'{s:.1f}' for s in steps)} us; "
              f"spread {spread:.2f}x (1.00 = perfectly linear)")  # fmt: skip
        verdicts.append(f"{label} {'met' if per_hop / raw <= 1.2 else 'NOT met'}")
    print(f"goal <= 1.2 raw verifies per hop: {', '.join(verdicts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
