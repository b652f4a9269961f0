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
from aegis.policy.store import Activation, PolicyStore, SqlPolicyStore
from aegis.registry.service import check_id
from aegis.stores.base import RegistryStore
from aegis.types import Event

__all__ = [
    "EVENT_ACTIVATED",
    "EVENT_REJECTED",
    "EVENT_STORED",
    "EventHook",
    "PolicyService",
    "RegistryEvents",
    "registry_event_hook",
]

EVENT_STORED: Final = "policy.stored"
EVENT_ACTIVATED: Final = "policy.activated"
EVENT_REJECTED: Final = "policy.rejected"

EventHook = Callable[[dict[str, Any]], None]


def _as_event(event: dict[str, Any]) -> Event:
    data = {k: v for k, v in event.items() if k not in ("event", "time", "actor")}
    tenant = data.get("tenant")
    subject = f"policy:{tenant}/{data.get('env')}" if tenant else f"policy:{data.get('version')}"
    return Event(new_id(), event["time"], event["event"], event["actor"], subject, tenant, data)


class RegistryEvents:
    """An ``emit`` hook that appends each policy event to the registry's lifecycle event log
    (where agent and client events already are), subject ``policy:<tenant>/<env>`` for
    activations and ``policy:<version>`` otherwise. When the policy store keeps its tables in
    the registry's database, an activation's event is written in the activation's own
    transaction (:meth:`PolicyService.activate`)."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    def __call__(self, event: dict[str, Any]) -> None:
        self.store.append_event(_as_event(event))


def registry_event_hook(store: RegistryStore) -> EventHook:
    """A :class:`RegistryEvents` hook on ``store``."""
    return RegistryEvents(store)


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
        """Make a stored version active for (tenant, env), if it passes today's checks. The
        tenant and env must be ids the registry accepts: ``Acme`` could never match a route, and
        an operator would believe a policy in force that no call is decided by."""
        check_id(tenant, "tenant")
        check_id(env, "env")
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
        # The event is made inside the store's transaction, which serialises activations, so it
        # names the version this one really replaced and is timed after the one before. Where
        # the store shares the registry's database, it is written in that transaction: an
        # activation never takes effect unrecorded. Elsewhere it is appended once committed.
        in_store = (
            isinstance(self._emit, RegistryEvents)
            and isinstance(self._store, SqlPolicyStore)
            and self._store.shares_database(self._emit.store)
        )
        made: list[dict[str, Any]] = []

        def record(activation: Activation, previous: str | None) -> Event | None:
            made.append({"event": EVENT_ACTIVATED, "time": self._clock.now(), "actor": actor,
                         "tenant": tenant, "env": env, "version": version,
                         "previous": previous})  # fmt: skip
            return _as_event(made[-1]) if in_store else None

        activation = self._store.activate(
            tenant, env, version, actor=actor, now=self._clock.now(), record=record
        )
        if not in_store:
            self._emit(made[-1])
        return activation

    def publish(
        self, text: str | bytes, *, tenant: str, env: str, actor: str, file: str = "<policy>"
    ) -> Activation:
        """Validate, store and activate in one step; a rejected document changes nothing."""
        version = self.store(text, file=file, actor=actor)
        return self.activate(tenant, env, version, actor=actor)
