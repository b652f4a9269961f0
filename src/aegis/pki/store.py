"""Issued certificates, revocations (RFC 5280 §5 CRL entries) and bootstrap tokens, in SQL.

The store is the authority on revocation: the CRL is rendered from it, and every peer certificate
is checked against it (through a per-serial cache of at most ``ttl`` seconds, like the registry
cache). Any database failure is ``Unavailable`` and the caller fails closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from aegis.clock import Clock
from aegis.errors import AegisError, Conflict, Unavailable
from aegis.pki.sql_tables import BOOTSTRAP_TOKENS, CERTIFICATES, METADATA, REVOKED_INDEX
from aegis.stores.sql.engine import (
    HOT_PATH_STATEMENT_TIMEOUT,
    create_tables,
    lock_schema,
    make_engine,
)

__all__ = ["CertificateRecord", "CertificateStore"]


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    agent_id: str
    tenant_id: str
    env: str
    spiffe_id: str
    issuer_ski: str
    x5t_s256: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None = None
    revocation_reason: str | None = None
    enrolled_by: str | None = None


class CertificateStore:
    def __init__(self, engine: Engine | str, *, clock: Clock, ttl: float = 0.25) -> None:
        # Peer checks read it on calls' path: a stalled database is an error within the
        # hot-path bound (callers fail closed), not an indefinite wait.
        self._engine = (
            make_engine(engine, statement_timeout=HOT_PATH_STATEMENT_TIMEOUT)
            if isinstance(engine, str)
            else engine
        )
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[str, tuple[float, CertificateRecord, int]] = {}
        #: Bumped by every revocation here: a record read before it is not cached after it (a
        #: read may run on a worker thread while the revocation lands, see :meth:`lookup_async`).
        self._generation = 0
        with self._guard():
            create_tables(METADATA, self._engine)
            with self._engine.begin() as conn:  # databases made before the index existed
                lock_schema(conn)
                REVOKED_INDEX.create(conn, checkfirst=True)
                # ... and before certificates recorded the client that enrolled them.
                columns = {c["name"] for c in inspect(conn).get_columns(CERTIFICATES.name)}
                if "enrolled_by" not in columns:
                    conn.execute(text(
                        f"ALTER TABLE {CERTIFICATES.name} ADD COLUMN enrolled_by VARCHAR(128)"
                    ))  # fmt: skip

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except AegisError:
            raise
        except IntegrityError as exc:
            raise Conflict("a certificate with this serial is already recorded") from exc
        except SQLAlchemyError as exc:
            raise Unavailable(
                "the certificate store cannot answer; certificates are refused until it does",
                code="revocation_store_unavailable",
            ) from exc

    def close(self) -> None:
        self._engine.dispose()

    # -- certificates ----------------------------------------------------------------------

    def record(self, rec: CertificateRecord) -> None:
        with self._guard(), self._engine.begin() as conn:
            conn.execute(insert(CERTIFICATES).values(**_row(rec)))

    def get(self, serial: str) -> CertificateRecord | None:
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(select(CERTIFICATES).where(CERTIFICATES.c.serial == serial)).first()
        return CertificateRecord(**row._mapping) if row is not None else None

    def for_agent(self, agent_id: str) -> list[CertificateRecord]:
        with self._guard(), self._engine.connect() as conn:
            rows = conn.execute(
                select(CERTIFICATES)
                .where(CERTIFICATES.c.agent_id == agent_id)
                .order_by(CERTIFICATES.c.issued_at)
            ).all()
        return [CertificateRecord(**r._mapping) for r in rows]

    def revoke_serial(self, serial: str, reason: str) -> bool:
        """Revoke one certificate; True if it was live until now."""
        now = self._clock.now()
        with self._guard(), self._engine.begin() as conn:
            result = conn.execute(
                update(CERTIFICATES)
                .where(CERTIFICATES.c.serial == serial, CERTIFICATES.c.revoked_at.is_(None))
                .values(revoked_at=now, revocation_reason=reason)
            )
        self._generation += 1
        self._cache.pop(serial, None)
        return bool(result.rowcount)

    def revoke_agent(self, agent_id: str, reason: str) -> list[str]:
        """Revoke every unexpired certificate of ``agent_id``; returns their serials."""
        return self._revoke_live(CERTIFICATES.c.agent_id == agent_id, reason)

    def revoke_tenant(self, tenant_id: str, reason: str) -> list[str]:
        """Revoke every unexpired certificate of every agent of ``tenant_id``; their serials."""
        return self._revoke_live(CERTIFICATES.c.tenant_id == tenant_id, reason)

    def revoke_enrolled_by(self, client_id: str, reason: str) -> list[str]:
        """Revoke every unexpired certificate enrolled with ``client_id``'s credentials."""
        return self._revoke_live(CERTIFICATES.c.enrolled_by == client_id, reason)

    def _revoke_live(self, which: Any, reason: str) -> list[str]:
        now = self._clock.now()
        cols = CERTIFICATES.c
        live = (which, cols.revoked_at.is_(None), cols.not_after > now)
        with self._guard(), self._engine.begin() as conn:
            serials = [r[0] for r in conn.execute(select(cols.serial).where(*live))]
            conn.execute(
                update(CERTIFICATES).where(*live).values(revoked_at=now, revocation_reason=reason)
            )
        self._generation += 1
        for serial in serials:
            self._cache.pop(serial, None)
        return serials

    def _cached(self, serial: str) -> CertificateRecord | None:
        hit = self._cache.get(serial)
        # An entry of an older generation was read before a revocation or forget(): even if a
        # reader stored it after that (its compare and store are not one step), it is not used.
        if (
            hit is not None
            and hit[2] == self._generation
            and self._clock.monotonic() - hit[0] < self._ttl
        ):
            return hit[1]
        return None

    def lookup(self, serial: str) -> CertificateRecord | None:
        """The record of ``serial`` through a cache of at most ``ttl`` seconds (hot path)."""
        hit = self._cached(serial)
        if hit is not None:
            return hit
        now, generation = self._clock.monotonic(), self._generation
        rec = self.get(serial)
        if rec is None:
            return None  # nothing negative is cached: a certificate issued elsewhere works at once
        if generation == self._generation:  # no revocation here since the read began
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[serial] = (now, rec, generation)
        return rec

    async def lookup_async(self, serial: str) -> CertificateRecord | None:
        """:meth:`lookup` for an event loop: a record not cached is read on a worker thread."""
        hit = self._cached(serial)
        return hit if hit is not None else await asyncio.to_thread(self.lookup, serial)

    def revocation_mark(self) -> tuple[int, float]:
        """How many certificates are revoked and the latest revocation time: it changes with every
        revocation, by this process or any other on the database."""
        cols = CERTIFICATES.c
        with self._guard(), self._engine.connect() as conn:
            count, latest = conn.execute(
                select(func.count(), func.max(cols.revoked_at)).where(cols.revoked_at.is_not(None))
            ).one()
        return int(count), float(latest or 0.0)

    def forget(self) -> None:
        """Drop every cached record (a revocation was made elsewhere): the next lookups read the
        store, and a read already under way is not cached."""
        self._generation += 1
        self._cache.clear()

    def revoked_by(self, issuer_ski: str) -> list[CertificateRecord]:
        """Revoked, unexpired certificates of one issuer (RFC 5280 §3.3: expired ones may go)."""
        now = self._clock.now()
        cols = CERTIFICATES.c
        with self._guard(), self._engine.connect() as conn:
            rows = conn.execute(
                select(CERTIFICATES)
                .where(
                    cols.issuer_ski == issuer_ski,
                    cols.revoked_at.is_not(None),
                    cols.not_after > now,
                )
                .order_by(cols.serial)
            ).all()
        return [CertificateRecord(**r._mapping) for r in rows]

    # -- bootstrap tokens ------------------------------------------------------------------

    def add_bootstrap(self, token_hash: str, agent_id: str, expires_at: float) -> None:
        with self._guard(), self._engine.begin() as conn:
            conn.execute(
                insert(BOOTSTRAP_TOKENS).values(
                    token_hash=token_hash,
                    agent_id=agent_id,
                    created_at=self._clock.now(),
                    expires_at=expires_at,
                )
            )

    def consume_bootstrap(self, token_hash: str) -> tuple[str, float] | None:
        """Spend a bootstrap token atomically; its agent id and creation time, or None if
        unknown, used or expired."""
        now = self._clock.now()
        t = BOOTSTRAP_TOKENS.c
        with self._guard(), self._engine.begin() as conn:
            row = conn.execute(
                select(t.agent_id, t.created_at).where(t.token_hash == token_hash)
            ).first()
            result = conn.execute(
                update(BOOTSTRAP_TOKENS)
                .where(t.token_hash == token_hash, t.used_at.is_(None), t.expires_at > now)
                .values(used_at=now)
            )
        if row is None or result.rowcount != 1:
            return None
        return str(row[0]), float(row[1])


def _row(rec: CertificateRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in CertificateRecord.__slots__}
