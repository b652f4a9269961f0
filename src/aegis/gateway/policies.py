"""Which policy decides a call: the active version for the route's tenant and environment, or the
configured allow-list while none is active (ARCHITECTURE.md, pipeline step 7).

One :class:`~aegis.policy.watcher.PolicyWatcher` per (tenant, env) polls the policy store and swaps
in newly activated versions. Three cases, none of which can turn into an allow by accident:

* a policy is in force: it decides (its evaluator turns any internal failure into a
  ``policy_error`` deny);
* the latest poll reached the store and it answered that no version is active: the allow-list
  decides, default deny (``policy_version = "allowlist"``);
* no policy is loaded and the store has not given that answer (no poll has succeeded yet, the
  first one is under way, or the latest one failed in any way): ``Unavailable(policy_unavailable)``,
  a 503. The allow-list is never a stand-in for a policy Aegis could not read. Once a policy was
  loaded it stays in force through a store outage (it was valid when activated).

A missing ``request.body`` makes every condition on it false (docs/policy.md), so a deny rule on
the body would not fire for a body policy never saw (streamed, too large, or not sent as JSON). When
the policy in force reads the body of a tool, such a call is refused (``invalid_request``) instead.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Final

from aegis.clock import Clock
from aegis.config import GatewayAllow
from aegis.errors import InvalidRequest, Unavailable
from aegis.policy.decision import Decision
from aegis.policy.evaluator import CompiledPolicy
from aegis.policy.ir import leaves
from aegis.policy.store import PolicyStore
from aegis.policy.watcher import NO_POLICY_REASON, PolicyWatcher
from aegis.telemetry.logging import log_event

__all__ = [
    "ALLOWLIST_REASON",
    "ALLOWLIST_VERSION",
    "PolicyDirectory",
    "allowlist_decision",
    "policy_query_names",
    "policy_reads_body",
]

ALLOWLIST_VERSION: Final = "allowlist"
ALLOWLIST_REASON: Final = "no active policy; allowed by the gateway allow-list"
_WILDCARD: Final = "*"
_BODY: Final = ("request", "body")
_QUERY: Final = ("request", "query")
#: ``_query_names`` of a policy that reads the whole query object (every name counts).
_EVERY_NAME: Final = frozenset({"*"})
_MAX_CACHED: Final = 4096


def policy_reads_body(policy: CompiledPolicy, tool: str) -> bool:
    """Whether any rule that can apply to ``tool`` has a condition on the request body."""
    for rule in policy.candidates(tool):
        nodes = [*rule.lowered.match, *([rule.lowered.when] if rule.lowered.when else [])]
        for leaf in (leaf for node in nodes for leaf in leaves(node)):
            if leaf.path[:2] == _BODY or _BODY[: len(leaf.path)] == leaf.path:
                return True
    return False


def policy_query_names(policy: CompiledPolicy, tool: str) -> frozenset[str]:
    """The query parameters that conditions of rules that can apply to ``tool`` read
    (:data:`_EVERY_NAME` when one reads the whole query object)."""
    names: set[str] = set()
    for rule in policy.candidates(tool):
        nodes = [*rule.lowered.match, *([rule.lowered.when] if rule.lowered.when else [])]
        for leaf in (leaf for node in nodes for leaf in leaves(node)):
            if leaf.path[:2] == _QUERY and len(leaf.path) > 2:
                names.add(leaf.path[2])
            elif _QUERY[: len(leaf.path)] == leaf.path:
                return _EVERY_NAME
    return frozenset(names)


def allowlist_decision(allow: tuple[GatewayAllow, ...], tool: str, agent_id: str) -> Decision:
    """Allow only a listed (tool, agent) pair; everything else is a default deny."""
    for entry in allow:
        if entry.tool == tool and (_WILDCARD in entry.agents or agent_id in entry.agents):
            return Decision("allow", (ALLOWLIST_REASON,), (f"allowlist:{tool}",), ALLOWLIST_VERSION)
    return Decision("deny", (NO_POLICY_REASON,), (), ALLOWLIST_VERSION, code="access_denied")


class PolicyDirectory:
    """Active policies per (tenant, env), each hot-reloaded by its own watcher."""

    def __init__(
        self,
        store: PolicyStore | None,
        *,
        clock: Clock,
        interval: float,
        allow: tuple[GatewayAllow, ...] = (),
        background: bool = False,
    ) -> None:
        self._store, self._clock, self._interval, self._allow = store, clock, interval, allow
        #: With ``background``, one thread polls every watcher each ``interval`` (real time) and
        #: calls read the answer it left, so a slow policy store never holds a call or the event
        #: loop (the gateway); the thread ends when the directory is gone.
        self._background = background
        self._polling = False
        self._watchers: dict[tuple[str, str], PolicyWatcher] = {}
        self._lock = threading.Lock()
        self._reads: dict[tuple[str, str], bool] = {}
        self._query_names: dict[tuple[str, str], frozenset[str]] = {}

    def _watcher(self, tenant: str, env: str) -> PolicyWatcher | None:
        if self._store is None:
            return None
        key = (tenant, env)
        watcher = self._watchers.get(key)
        if watcher is None:
            with self._lock:
                watcher = self._watchers.get(key)
                if watcher is None:
                    watcher = PolicyWatcher(
                        self._store,
                        tenant=tenant,
                        env=env,
                        clock=self._clock,
                        interval=self._interval,
                        polled_elsewhere=self._background,
                    )
                    self._watchers[key] = watcher
                    if self._background and not self._polling:
                        self._polling = True
                        _start_polling(weakref.ref(self), self._interval)
        return watcher

    def _reads_body(self, policy: CompiledPolicy, tool: str) -> bool:
        key = (policy.version, tool)
        found = self._reads.get(key)
        if found is None:
            if len(self._reads) >= _MAX_CACHED:
                self._reads.clear()
            found = self._reads[key] = policy_reads_body(policy, tool)
        return found

    def _repeated_and_read(self, policy: CompiledPolicy, tool: str, doc: dict[str, Any]) -> str:
        """A query parameter the call repeats and a condition reads, else ``""``."""
        query = doc.get("request", {}).get("query") or {}
        repeated = [name for name, value in query.items() if isinstance(value, list)]
        if not repeated:
            return ""
        key = (policy.version, tool)
        names = self._query_names.get(key)
        if names is None:
            if len(self._query_names) >= _MAX_CACHED:
                self._query_names.clear()
            names = self._query_names[key] = policy_query_names(policy, tool)
        return next((n for n in repeated if names is _EVERY_NAME or n in names), "")

    def reads_body(self, tenant: str, env: str, tool: str) -> bool:
        """Whether the policy in force for the route reads request bodies of ``tool`` (the proxy
        then buffers the body for it); False for the allow-list, which never does."""
        watcher = self._watcher(tenant, env)
        policy = watcher.current() if watcher is not None else None
        return policy is not None and self._reads_body(policy, tool)

    def decide(
        self,
        tenant: str,
        env: str,
        tool: str,
        agent_id: str,
        doc: dict[str, Any],
        *,
        body_hidden: bool = False,
    ) -> Decision:
        """The decision for one call; ``body_hidden`` says the call has a body that is not in
        ``doc`` (streamed, over the buffering limit, or not JSON)."""
        watcher = self._watcher(tenant, env)
        policy = watcher.current() if watcher is not None else None
        if policy is None and watcher is not None and not watcher.nothing_active:
            raise Unavailable(
                "the policy store has not answered and no policy is loaded; call refused",
                code="policy_unavailable",
            )
        if policy is not None:
            if body_hidden and self._reads_body(policy, tool):
                raise InvalidRequest(
                    "the policy for this tool reads the request body; send it as JSON "
                    "(content-type application/json, no content-encoding) within "
                    "gateway.max_body_bytes"
                )
            repeated = self._repeated_and_read(policy, tool, doc)
            if repeated:
                # A condition such as ``action eq delete`` is false for ["read", "delete"], while
                # the upstream may read either value.
                raise InvalidRequest(
                    f"the query parameter {repeated[:64]!r} is repeated and the policy for this "
                    "tool reads it; send it once"
                )
            return policy.evaluate(doc)
        return allowlist_decision(self._allow, tool, agent_id)

    def poll_all(self) -> None:
        """One round of the poll thread: every watcher, each failure recorded by its watcher."""
        for watcher in list(self._watchers.values()):
            watcher.poll_now()

    def refresh(self) -> None:
        """Poll every watcher now (after an activation in this process, and in tests)."""
        for watcher in list(self._watchers.values()):
            watcher.poll()


def _start_polling(directory: weakref.ref[PolicyDirectory], interval: float) -> None:
    def run() -> None:
        while True:
            time.sleep(interval)
            alive = directory()
            if alive is None:
                return
            try:
                alive.poll_all()
            except Exception as exc:  # the thread must outlive any one round: calls read it
                log_event("policy.poll_round_failed", level=logging.ERROR, error=type(exc).__name__)
            del alive  # no strong reference while sleeping: the directory may go

    threading.Thread(target=run, name="aegis-policy", daemon=True).start()
