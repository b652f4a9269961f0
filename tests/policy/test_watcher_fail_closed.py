"""A policy read that fails in any way, an untranslated exception included, is a refusal.

The allow-list decides only after the store answered that no version is active; before the first
successful poll, while it is under way, and after a failed one, calls are ``policy_unavailable``.
"""

from __future__ import annotations

from typing import Any

import pytest

from aegis.clock import FrozenClock
from aegis.config import GatewayAllow
from aegis.errors import Unavailable
from aegis.gateway.policies import ALLOWLIST_VERSION, PolicyDirectory
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from aegis.policy.watcher import NO_POLICY_REASON, PolicyWatcher

DENY_PAYMENTS = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: deny-all}
spec:
  rules:
    - {id: no-payments, action: deny, reason: payments frozen, match: {tools: ["payments"]}}
"""
ALLOW = (GatewayAllow(tool="payments"),)
DOC = {"tool": "payments"}


class FlakyStore(MemoryPolicyStore):
    """Holds an active deny policy; its first ``failures`` reads of ``method`` raise an error that
    is not an AegisError (a driver failure that escaped translation)."""

    def __init__(self, method: str = "active", failures: int = 1) -> None:
        super().__init__()
        self.method, self.failures = method, failures
        version = self.put(load_document(DENY_PAYMENTS), now=0)
        self.activate("acme", "prod", version, actor="t", now=0)

    def _maybe_fail(self, method: str) -> None:
        if self.method == method and self.failures:
            self.failures -= 1
            raise RuntimeError("unexpected driver error")

    def active(self, tenant: str, env: str) -> Any:
        self._maybe_fail("active")
        return super().active(tenant, env)

    def get(self, version: str) -> Any:
        self._maybe_fail("get")
        return super().get(version)


@pytest.mark.parametrize("method", ["active", "get"])
def test_watcher_records_an_unexpected_exception_as_policy_unavailable(method: str) -> None:
    clock = FrozenClock(0)
    watcher = PolicyWatcher(FlakyStore(method), tenant="acme", env="prod", clock=clock, interval=2)
    assert watcher.current() is None
    assert isinstance(watcher.last_error, Unavailable)
    assert watcher.last_error.code == "policy_unavailable"
    assert not watcher.nothing_active
    decision = watcher.evaluate(DOC)
    assert (decision.action, decision.code, decision.reasons) == (
        "deny",
        "policy_unavailable",
        (NO_POLICY_REASON,),
    )
    clock.advance(2)
    assert watcher.evaluate(DOC).action == "deny"
    assert watcher.current() is not None and watcher.last_error is None


@pytest.mark.parametrize("method", ["active", "get"])
def test_failed_first_poll_refuses_every_call_until_the_store_answers(method: str) -> None:
    clock = FrozenClock(0)
    directory = PolicyDirectory(FlakyStore(method), clock=clock, interval=2, allow=ALLOW)
    for _ in range(3):  # the allow-list would allow every one of these
        with pytest.raises(Unavailable) as info:
            directory.decide("acme", "prod", "payments", "a", DOC)
        assert info.value.code == "policy_unavailable"
        clock.advance(0.5)
    clock.advance(0.5)
    decision = directory.decide("acme", "prod", "payments", "a", DOC)
    assert (decision.action, decision.policy_version[:7]) == ("deny", "sha256:")


def test_a_call_during_the_first_poll_is_refused_not_allowlisted() -> None:
    clock = FrozenClock(0)
    seen: list[BaseException] = []

    class Reentrant(MemoryPolicyStore):
        def active(self, tenant: str, env: str) -> Any:
            # Another call arrives while this read is under way (the next poll is already
            # scheduled, so it does not wait for this one).
            try:
                directory.decide(tenant, env, "payments", "b", DOC)
            except Unavailable as exc:
                seen.append(exc)
            return super().active(tenant, env)

    directory = PolicyDirectory(Reentrant(), clock=clock, interval=2, allow=ALLOW)
    first = directory.decide("acme", "prod", "payments", "a", DOC)
    assert (first.action, first.policy_version) == ("allow", ALLOWLIST_VERSION)
    assert [getattr(exc, "code", None) for exc in seen] == ["policy_unavailable"]


def test_allowlist_stops_when_a_later_poll_fails() -> None:
    clock = FrozenClock(0)
    empty = MemoryPolicyStore()
    directory = PolicyDirectory(empty, clock=clock, interval=2, allow=ALLOW)
    assert directory.decide("acme", "prod", "payments", "a", DOC).action == "allow"

    def broken(tenant: str, env: str) -> Any:
        raise RuntimeError("unexpected driver error")

    empty.active = broken  # type: ignore[method-assign]
    clock.advance(2)
    with pytest.raises(Unavailable) as info:
        directory.decide("acme", "prod", "payments", "a", DOC)
    assert info.value.code == "policy_unavailable"
