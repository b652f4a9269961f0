"""The policy store: content-addressed versions and per-(tenant, env) activations.

``PolicyStore`` is the Protocol; :class:`MemoryPolicyStore` and :class:`SqlPolicyStore` both pass
the contract tests in ``tests/policy/test_store.py``. Stores hold only validated documents (the
service validates before storing) and re-check the content address on every read, so a row edited
behind Aegis's back is refused rather than enforced. SQL failures are ``Unavailable`` with code
``policy_unavailable``: callers keep their last good policy or fail closed.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Protocol

from pydantic import ValidationError
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from aegis.errors import AegisError, NotFound, PolicyError, Unavailable
from aegis.policy.model import STORED, PolicyDocument
from aegis.policy.sql_tables import METADATA, POLICY_ACTIVATIONS, POLICY_VERSIONS
from aegis.policy.version import canonical_json, policy_version
from aegis.stores.sql.engine import (
    HOT_PATH_STATEMENT_TIMEOUT,
    create_tables,
    lock_transaction,
    make_engine,
)
from aegis.stores.sql.schema import EVENTS
from aegis.types import Event

__all__ = [
    "Activation",
    "MemoryPolicyStore",
    "PolicyStore",
    "Recorder",
    "SqlPolicyStore",
    "StoredVersion",
]


@dataclass(frozen=True, slots=True)
class StoredVersion:
    version: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Activation:
    tenant: str
    env: str
    version: str
    activated_at: float
    actor: str


#: Called inside an activation's transaction (one activation of the store at a time) with the
#: activation and the version it replaces (None: none was active). A SQL store writes the event
#: it returns to the ``events`` table of its own database in that transaction, so that the
#: activation and its record commit together; None writes nothing there. An error it raises
#: undoes the activation.
Recorder = Callable[[Activation, str | None], Event | None]
#: Serialises activations (any scope, any process) on PostgreSQL: ids then follow commit order,
#: so the newest id is the active version and each activation knows the one it replaced.
_ACTIVATION_LOCK: Final = zlib.crc32(b"aegis:policy-activation")


class PolicyStore(Protocol):
    def put(self, doc: PolicyDocument, *, now: float) -> str:
        """Store a validated document (idempotent); return its version."""
        ...

    def get(self, version: str) -> PolicyDocument:
        """The document of ``version``; ``NotFound`` if unknown."""
        ...

    def versions(self) -> list[StoredVersion]:
        """Every stored version, oldest first."""
        ...

    def activate(
        self,
        tenant: str,
        env: str,
        version: str,
        *,
        actor: str,
        now: float,
        record: Recorder | None = None,
    ) -> Activation:
        """Make ``version`` (which must be stored) active for the scope; ``record`` is called
        before the activation is committed (:data:`Recorder`)."""
        ...

    def active(self, tenant: str, env: str) -> Activation | None:
        """The current activation of the scope, if any."""
        ...

    def history(self, tenant: str, env: str) -> list[Activation]:
        """Every activation of the scope, oldest first."""
        ...


def _decode(version: str, text: str) -> PolicyDocument:
    try:
        doc = PolicyDocument.model_validate(json.loads(text), context=STORED)
    except (ValueError, ValidationError) as exc:
        raise PolicyError(
            f"stored policy {version} no longer validates; restore it from source",
            code="policy_error",
        ) from exc
    if policy_version(doc) != version:
        raise PolicyError(
            f"stored policy {version} does not hash to its version; restore it from source",
            code="policy_error",
        )
    return doc


def _not_found(version: str) -> NotFound:
    return NotFound(f"policy version {version} is not stored; put the document first")


class MemoryPolicyStore:
    """A thread-safe in-memory store (single process, tests, ``aegis up``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[StoredVersion, str]] = {}
        self._activations: list[Activation] = []

    def put(self, doc: PolicyDocument, *, now: float) -> str:
        version = policy_version(doc)
        with self._lock:
            if version not in self._docs:
                record = StoredVersion(version, doc.metadata.name, now)
                self._docs[version] = (record, canonical_json(doc.canonical()).decode())
        return version

    def get(self, version: str) -> PolicyDocument:
        with self._lock:
            found = self._docs.get(version)
        if found is None:
            raise _not_found(version)
        return _decode(version, found[1])

    def versions(self) -> list[StoredVersion]:
        with self._lock:
            return sorted((r for r, _ in self._docs.values()), key=lambda r: r.created_at)

    def activate(
        self,
        tenant: str,
        env: str,
        version: str,
        *,
        actor: str,
        now: float,
        record: Recorder | None = None,
    ) -> Activation:
        with self._lock:
            if version not in self._docs:
                raise _not_found(version)
            activation = Activation(tenant, env, version, now, actor)
            scope = [a for a in self._activations if (a.tenant, a.env) == (tenant, env)]
            if record is not None:
                record(activation, scope[-1].version if scope else None)
            self._activations.append(activation)
        return activation

    def active(self, tenant: str, env: str) -> Activation | None:
        history = self.history(tenant, env)
        return history[-1] if history else None

    def history(self, tenant: str, env: str) -> list[Activation]:
        with self._lock:
            return [a for a in self._activations if (a.tenant, a.env) == (tenant, env)]


class SqlPolicyStore:
    """SQLAlchemy Core store (SQLite embedded, PostgreSQL in production)."""

    def __init__(self, engine: Engine | str) -> None:
        # The gateway polls the active version on its calls' path: a stalled database must be
        # policy_unavailable (the last good policy stays in force) within a bounded time.
        self._engine = (
            make_engine(engine, statement_timeout=HOT_PATH_STATEMENT_TIMEOUT)
            if isinstance(engine, str)
            else engine
        )
        with self._guard():
            create_tables(METADATA, self._engine)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except AegisError:
            raise
        except SQLAlchemyError as exc:
            raise Unavailable(
                "the policy store cannot answer; keep the last good policy or deny",
                code="policy_unavailable",
            ) from exc

    def close(self) -> None:
        self._engine.dispose()

    def put(self, doc: PolicyDocument, *, now: float) -> str:
        version = policy_version(doc)
        row = {
            "version": version,
            "name": doc.metadata.name,
            "document": canonical_json(doc.canonical()).decode(),
            "created_at": now,
        }
        with self._guard():
            try:
                with self._engine.begin() as conn:
                    conn.execute(insert(POLICY_VERSIONS).values(**row))
            except IntegrityError:
                self._restore(version, row)  # stored already: versions are immutable
        return version

    def _restore(self, version: str, row: dict[str, object]) -> None:
        """Put back the document of a row edited behind Aegis's back (it no longer hashes to
        its version), as storing its source again asks; a row that still reads as its version
        is left as it is."""
        t = POLICY_VERSIONS
        with self._engine.begin() as conn:
            stored = conn.execute(
                select(t.c.document).where(t.c.version == version).with_for_update()
            ).scalar_one()
            if stored == row["document"]:
                return
            try:
                _decode(version, stored)
                return
            except PolicyError:
                conn.execute(
                    update(t)
                    .where(t.c.version == version)
                    .values(document=row["document"], name=row["name"])
                )

    def get(self, version: str) -> PolicyDocument:
        with self._guard(), self._engine.connect() as conn:
            text = conn.execute(
                select(POLICY_VERSIONS.c.document).where(POLICY_VERSIONS.c.version == version)
            ).scalar_one_or_none()
        if text is None:
            raise _not_found(version)
        return _decode(version, text)

    def versions(self) -> list[StoredVersion]:
        t = POLICY_VERSIONS
        with self._guard(), self._engine.connect() as conn:
            rows = conn.execute(
                select(t.c.version, t.c.name, t.c.created_at).order_by(t.c.created_at)
            )
            return [StoredVersion(r.version, r.name, r.created_at) for r in rows]

    def activate(
        self,
        tenant: str,
        env: str,
        version: str,
        *,
        actor: str,
        now: float,
        record: Recorder | None = None,
    ) -> Activation:
        t = POLICY_ACTIVATIONS
        activation = Activation(tenant, env, version, now, actor)
        with self._guard(), self._engine.begin() as conn:
            lock_transaction(conn, _ACTIVATION_LOCK)  # SQLite: BEGIN IMMEDIATE
            known = conn.execute(
                select(POLICY_VERSIONS.c.version).where(POLICY_VERSIONS.c.version == version)
            ).first()
            if known is None:
                raise _not_found(version)
            previous = conn.execute(
                select(t.c.version)
                .where(t.c.tenant == tenant, t.c.env == env)
                .order_by(t.c.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            conn.execute(
                insert(t).values(
                    tenant=tenant, env=env, version=version, activated_at=now, actor=actor
                )
            )
            event = record(activation, previous) if record is not None else None
            if event is not None:
                conn.execute(
                    insert(EVENTS).values(
                        id=event.id, at=event.at, type=event.type, actor=event.actor,
                        subject=event.subject, tenant_id=event.tenant_id, data=event.data,
                    )
                )  # fmt: skip
        return activation

    def shares_database(self, other: object) -> bool:
        """Whether ``other`` (a SQL registry store) keeps its tables in this store's database."""
        engine = getattr(other, "engine", None)
        return isinstance(engine, Engine) and engine.url == self._engine.url

    def active(self, tenant: str, env: str) -> Activation | None:
        t = POLICY_ACTIVATIONS
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(
                select(t)
                .where(t.c.tenant == tenant, t.c.env == env)
                .order_by(t.c.id.desc())
                .limit(1)
            ).first()
        return _activation(row) if row is not None else None

    def history(self, tenant: str, env: str) -> list[Activation]:
        t = POLICY_ACTIVATIONS
        with self._guard(), self._engine.connect() as conn:
            rows = conn.execute(
                select(t).where(t.c.tenant == tenant, t.c.env == env).order_by(t.c.id)
            )
            return [_activation(r) for r in rows]


def _activation(row: object) -> Activation:
    m = row._mapping  # type: ignore[attr-defined]
    return Activation(m["tenant"], m["env"], m["version"], m["activated_at"], m["actor"])
