"""Hot reload for gateways: poll the store and swap in a newly activated policy version.

``PolicyWatcher.current()`` checks the store at most once per ``interval`` seconds (measured on the
injected clock), compiles a new version once, and swaps it in atomically; a decision therefore
always names the one version it used. If the store cannot answer, the last good policy stays in
force (it was valid when activated); if there has never been one, decisions are ``deny`` with code
``policy_unavailable``. A stored version that fails to load again is never swapped in.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from aegis.clock import Clock
from aegis.errors import AegisError
from aegis.policy.decision import Decision
from aegis.policy.evaluator import CompiledPolicy, compile_policy
from aegis.policy.store import PolicyStore

__all__ = ["DEFAULT_POLL_INTERVAL", "NO_POLICY_REASON", "PolicyWatcher"]

DEFAULT_POLL_INTERVAL: Final = 5.0
NO_POLICY_REASON: Final = "no active policy for this tenant and environment; denied"


class PolicyWatcher:
    def __init__(
        self,
        store: PolicyStore,
        *,
        tenant: str,
        env: str,
        clock: Clock,
        interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self._store, self._tenant, self._env = store, tenant, env
        self._clock, self._interval = clock, interval
        self._lock = threading.Lock()
        self._policy: CompiledPolicy | None = None
        self._next_poll = float("-inf")
        self.last_error: AegisError | None = None

    def poll(self) -> bool:
        """Check the store now; return True if a different version was swapped in."""
        self._next_poll = self._clock.monotonic() + self._interval
        try:
            activation = self._store.active(self._tenant, self._env)
            if activation is None:
                return False
            if self._policy is not None and self._policy.version == activation.version:
                return False
            fresh = compile_policy(self._store.get(activation.version), version=activation.version)
        except AegisError as exc:
            self.last_error = exc
            return False
        self.last_error = None
        self._policy = fresh
        return True

    def current(self) -> CompiledPolicy | None:
        """The policy in force, polling first if ``interval`` has passed."""
        if self._clock.monotonic() >= self._next_poll:
            with self._lock:
                if self._clock.monotonic() >= self._next_poll:
                    self.poll()
        return self._policy

    def evaluate(self, doc: dict[str, Any]) -> Decision:
        """Decide with the policy in force; deny with ``policy_unavailable`` if there is none."""
        policy = self.current()
        if policy is None:
            return Decision("deny", (NO_POLICY_REASON,), (), "", code="policy_unavailable")
        return policy.evaluate(doc)
