"""The caches behind cold and warm chain verification change no outcome.

Each scenario first verifies the chain (filling the memo of verified links and the imported-key
cache), then changes the registry and checks that the very next verification follows the change:
a rotated key (also under the same ``kid``), a removed key, a suspended or retired agent.
"""

from __future__ import annotations

import threading

import pytest

from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import AegisError, Unavailable
from aegis.registry.cache import RegistryCache
from aegis.tokens.chain import Chain, prefetch_chain_agents, verify_chain
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import PrefixDigest, chain_digest, forget_verified_links
from aegis.types import Agent, AgentStatus
from tests.support.delegation import Handle, World


async def _three_hops(w: World) -> tuple[Handle, Handle, Handle]:
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    await w.exchange(fin, w.grant(orch, fin))
    await w.exchange(pay, w.grant(fin, pay, scopes=("payments:write",), max_depth=1))
    return orch, fin, pay


def _check(w: World, token: AccessToken | None) -> Chain:
    assert token is not None
    return verify_chain(token, cache=w.cache, rules=w.rules, now=w.clock.now())


def _refused(w: World, token: AccessToken | None) -> str:
    with pytest.raises(AegisError) as exc:
        _check(w, token)
    return exc.value.code


@pytest.mark.parametrize("cold", [True, False])
async def test_a_rotated_key_ends_the_chain_even_under_the_same_kid(cold: bool) -> None:
    w = World()
    _, fin, pay = await _three_hops(w)
    assert _check(w, pay.token).depth == 2
    if cold:
        forget_verified_links()
    kid = fin.key.public.kid
    rotated = {**Ed25519SigningKey.generate().public.to_jwk(), "kid": kid}
    w.registry.update_agent("finance", actor="t", jwks=(rotated,))
    assert _refused(w, pay.token) == "parent_signature_invalid"
    # The registered kid now names the new key: the old signature must not verify under it.
    w.registry.update_agent("finance", actor="t", jwks=({**fin.key.public.to_jwk(), "kid": kid},))
    assert _check(w, pay.token).depth == 2


async def test_a_removed_key_ends_the_chain_while_another_key_stays() -> None:
    w = World()
    _, fin, pay = await _three_hops(w)
    other = Ed25519SigningKey.generate().public.to_jwk()
    w.registry.update_agent("finance", actor="t", jwks=(fin.key.public.to_jwk(), other))
    assert _check(w, pay.token).depth == 2  # memoized with both keys registered
    w.registry.update_agent("finance", actor="t", jwks=(other,))
    assert _refused(w, pay.token) == "parent_signature_invalid"
    forget_verified_links()
    assert _refused(w, pay.token) == "parent_signature_invalid"


@pytest.mark.parametrize(
    ("agent", "status", "code"),
    [
        ("orchestrator", AgentStatus.SUSPENDED, "parent_inactive"),
        ("finance", AgentStatus.SUSPENDED, "parent_inactive"),
        ("finance", AgentStatus.RETIRED, "parent_inactive"),
        ("payments", AgentStatus.SUSPENDED, "agent_inactive"),
    ],
)
async def test_an_inactive_agent_ends_a_memoized_chain(
    agent: str, status: AgentStatus, code: str
) -> None:
    w = World()
    _, _, pay = await _three_hops(w)
    for _ in range(2):  # the second call is served by the memo of verified links
        assert _check(w, pay.token).depth == 2
    w.registry.set_agent_status(agent, status, actor="t")
    assert _refused(w, pay.token) == code


def test_prefix_digest_equals_chain_digest_of_every_prefix() -> None:
    links = [f"h{i}.p{i}.s{i}" for i in range(5)]
    prefix = PrefixDigest()
    for n in range(len(links) + 1):
        assert prefix.value() == chain_digest(links[:n])
        assert prefix.value() == chain_digest(links[:n])  # reading it does not finalize it
        if n < len(links):
            prefix.add(links[n])
    assert chain_digest(["a.b.c~d.e.f"]) == chain_digest(["a.b.c", "d.e.f"])  # the wire form


async def test_the_chain_agents_are_read_on_the_cache_readers_not_the_event_loop() -> None:
    """The gateway fetches the agents a chain names before it verifies the chain synchronously:
    every registry read happens on the cache's reader threads, and verification then finds all
    of them in the cache."""
    w = World()
    _, _, pay = await _three_hops(w)
    assert pay.token is not None
    reads: list[str] = []
    real = w.store.get_agent

    def recorded(agent_id: str) -> Agent:
        reads.append(threading.current_thread().name)
        return real(agent_id)

    w.store.get_agent = recorded  # type: ignore[method-assign]
    cache = RegistryCache(w.store, clock=w.clock, ttl=1.0)
    try:
        await prefetch_chain_agents(pay.token, cache, w.rules)
        assert len(reads) == 3  # orchestrator, finance, payments
        assert threading.current_thread().name not in reads
        verify_chain(pay.token, cache=cache, rules=w.rules, now=w.clock.now())
        assert len(reads) == 3  # nothing read again, on the loop or elsewhere
    finally:
        cache.close()


async def test_prefetch_leaves_refusals_to_verification_but_not_outages() -> None:
    w = World()
    _, _, pay = await _three_hops(w)
    assert pay.token is not None
    broken = AccessToken.from_claims({**pay.token.claims, "parent_agent": "not.a.chain~x"})
    await prefetch_chain_agents(broken, w.cache, w.rules)  # malformed: verify_chain's to refuse
    assert _refused(w, broken) in {"malformed_token", "parent_signature_invalid"}

    def down(agent_id: str) -> Agent:
        raise Unavailable("registry down", code="registry_unavailable")

    w.store.get_agent = down  # type: ignore[method-assign]
    with pytest.raises(Unavailable) as refused:
        await prefetch_chain_agents(pay.token, w.cache, w.rules)
    assert refused.value.code == "registry_unavailable"
