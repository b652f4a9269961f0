"""Hot reload for gateways: poll the store and swap in a newly activated policy version.

``PolicyWatcher.current()`` checks the store at most once per ``interval`` seconds (measured on the
injected clock), compiles a new version once, and swaps it in atomically; a decision therefore
always names the one version it used. If the store cannot answer, the last good policy stays in
force (it was valid when activated); if there has never been one, decisions are ``deny`` with code
``policy_unavailable``. A stored version that fails to load again is never swapped in.

Every failed poll is recorded in ``last_error``; an exception that escaped translation to an
:class:`~aegis.errors.AegisError` is recorded as ``Unavailable(policy_unavailable)``.
``nothing_active`` is True only when the latest completed poll reached the store and it answered
that no version is active. That answer, and nothing weaker (no poll completed yet, the first one
under way, a failed poll), is what lets a caller fall back to another source of decisions.

A watcher made with ``polled_elsewhere`` (the gateway's, whose
:class:`~aegis.gateway.policies.PolicyDirectory` polls every watcher on its own thread each
``interval``) does not poll in ``current()`` once it has an answer to serve (a policy, or the
store's "nothing active"): a slow or stalled store then holds that thread, never a call or the
event loop. Until the first answer, ``current()`` polls when due, as without it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from aegis.clock import Clock
from aegis.errors import AegisError, Unavailable
from aegis.policy.decision import Decision
from aegis.policy.evaluator import CompiledPolicy, compile_policy
from aegis.policy.store import PolicyStore
from aegis.telemetry.logging import log_event

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
        polled_elsewhere: bool = False,
    ) -> None:
        self._store, self._tenant, self._env = store, tenant, env
        self._clock, self._interval = clock, interval
        self._polled_elsewhere = polled_elsewhere
        self._lock = threading.Lock()
        self._policy: CompiledPolicy | None = None
        self._next_poll = float("-inf")
        self.last_error: AegisError | None = None
        self._nothing_active = False

    @property
    def nothing_active(self) -> bool:
        """Whether the latest poll got a definite answer from the store: no version is active."""
        return self._nothing_active

    def poll(self) -> bool:
        """Check the store now; return True if a different version was swapped in.

        The next poll is scheduled before the store is read so that concurrent callers keep the
        policy in force instead of queueing behind a slow store; that is safe only because every
        outcome of this read, an unexpected exception included, is recorded below.
        """
        self._next_poll = self._clock.monotonic() + self._interval
        try:
            activation = self._store.active(self._tenant, self._env)
            self._nothing_active = activation is None
            if activation is None:
                self.last_error = None
                return False
            if self._policy is not None and self._policy.version == activation.version:
                self.last_error = None
                return False
            fresh = compile_policy(self._store.get(activation.version), version=activation.version)
        except AegisError as exc:
            self._nothing_active = False
            self.last_error = exc
            return False
        except Exception as exc:
            # A failure that escaped translation to an AegisError must still fail closed: left
            # unrecorded, the next calls until the next poll would see no policy and no error.
            log_event(
                "policy.poll_failed",
                level=logging.ERROR,
                tenant=self._tenant,
                env=self._env,
                error=type(exc).__name__,
            )
            self._nothing_active = False
            self.last_error = Unavailable(
                "the policy store read failed unexpectedly; calls are refused until it answers",
                code="policy_unavailable",
            )
            return False
        self.last_error = None
        self._policy = fresh
        return True

    def current(self) -> CompiledPolicy | None:
        """The policy in force, polling first if ``interval`` has passed (unless polled
        elsewhere and already answered, see the module docstring)."""
        if self._clock.monotonic() >= self._next_poll:
            if self._polled_elsewhere and (self._policy is not None or self._nothing_active):
                return self._policy
            with self._lock:
                if self._clock.monotonic() >= self._next_poll:
                    self.poll()
        return self._policy

    def poll_now(self) -> None:
        """Poll, one poll at a time with ``current()`` (the directory's poll thread)."""
        with self._lock:
            self.poll()

    def evaluate(self, doc: dict[str, Any]) -> Decision:
        """Decide with the policy in force; deny with ``policy_unavailable`` if there is none."""
        policy = self.current()
        if policy is None:
            return Decision("deny", (NO_POLICY_REASON,), (), "", code="policy_unavailable")
        return policy.evaluate(doc)
