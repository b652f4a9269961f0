"""Publishing and activating policy versions, with an audit event for every change.

``publish`` validates before it stores: a document that fails to load raises
``PolicyError(policy_invalid)``, emits a ``policy.rejected`` event and leaves the active version
untouched. ``activate`` checks the stored version again, with today's load-time checks: a version
stored before a check was added (a rule that can never match, say a deny on a field policy input
never holds) stays readable, so the active policy keeps loading, but is not made active anew.
Events are plain dicts passed to an ``emit`` hook; the audit log subscribes later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from aegis.clock import Clock, new_id
from aegis.errors import PolicyError
from aegis.policy.loader import load_document
from aegis.policy.store import Activation, PolicyStore
from aegis.stores.base import RegistryStore
from aegis.types import Event

__all__ = [
    "EVENT_ACTIVATED",
    "EVENT_REJECTED",
    "EVENT_STORED",
    "EventHook",
    "PolicyService",
    "registry_event_hook",
]

EVENT_STORED: Final = "policy.stored"
EVENT_ACTIVATED: Final = "policy.activated"
EVENT_REJECTED: Final = "policy.rejected"

EventHook = Callable[[dict[str, Any]], None]


def registry_event_hook(store: RegistryStore) -> EventHook:
    """An ``emit`` hook that appends each policy event to the registry's lifecycle event log
    (where agent and client events already are), subject ``policy:<tenant>/<env>`` for
    activations and ``policy:<version>`` otherwise."""

    def emit(event: dict[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k not in ("event", "time", "actor")}
        tenant = data.get("tenant")
        subject = (
            f"policy:{tenant}/{data.get('env')}" if tenant else f"policy:{data.get('version')}"
        )
        store.append_event(
            Event(new_id(), event["time"], event["event"], event["actor"], subject, tenant, data)
        )

    return emit


class PolicyService:
    def __init__(self, store: PolicyStore, *, clock: Clock, emit: EventHook | None = None) -> None:
        self._store = store
        self._clock = clock
        self._emit: EventHook = emit or (lambda _event: None)

    def _event(self, kind: str, **fields: Any) -> None:
        self._emit({"event": kind, "time": self._clock.now(), **fields})

    def store(self, text: str | bytes, *, file: str = "<policy>", actor: str) -> str:
        """Validate and store a document; return its version. Activates nothing."""
        try:
            doc = load_document(text, file)
        except PolicyError as exc:
            self._event(EVENT_REJECTED, actor=actor, file=file, code=exc.code, message=exc.message)
            raise
        version = self._store.put(doc, now=self._clock.now())
        self._event(EVENT_STORED, actor=actor, version=version, name=doc.metadata.name)
        return version

    def activate(self, tenant: str, env: str, version: str, *, actor: str) -> Activation:
        """Make a stored version active for (tenant, env), if it passes today's checks."""
        doc = self._store.get(version)  # NotFound for a version never stored
        try:
            load_document(json.dumps(doc.canonical()), "<stored policy>")
        except PolicyError as exc:
            message = (
                f"policy {version} no longer passes the checks a policy must pass to load, so it "
                f"is not activated ({exc.message}); publish a corrected version"
            )
            self._event(EVENT_REJECTED, actor=actor, file="<stored policy>", code=exc.code,
                        message=message, version=version, tenant=tenant, env=env)  # fmt: skip
            raise PolicyError(message, code=exc.code, version=version, errors=exc.details.get(
                "errors", [])) from exc  # fmt: skip
        previous = self._store.active(tenant, env)
        activation = self._store.activate(tenant, env, version, actor=actor, now=self._clock.now())
        self._event(
            EVENT_ACTIVATED,
            actor=actor,
            tenant=tenant,
            env=env,
            version=version,
            previous=previous.version if previous else None,
        )
        return activation

    def publish(
        self, text: str | bytes, *, tenant: str, env: str, actor: str, file: str = "<policy>"
    ) -> Activation:
        """Validate, store and activate in one step; a rejected document changes nothing."""
        version = self.store(text, file=file, actor=actor)
        return self.activate(tenant, env, version, actor=actor)
