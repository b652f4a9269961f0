"""The signing-key store on SQL: key records with the private key only as ciphertext."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select

from aegis.stores.sql.connection import SqlBase, check_values
from aegis.stores.sql.schema import EVENTS, SIGNING_KEYS
from aegis.types import Event, KeyState, SigningKeyRecord

__all__ = ["SqlKeyStore"]

_ORDERED = select(SIGNING_KEYS).order_by(SIGNING_KEYS.c.created_at, SIGNING_KEYS.c.kid)


def _row(r: SigningKeyRecord) -> dict[str, Any]:
    return {
        "kid": r.kid,
        "alg": r.alg,
        "state": r.state.value,
        "public_jwk": r.public_jwk,
        "private_blob": r.private_blob,
        "created_at": r.created_at,
        "activated_at": r.activated_at,
        "retired_at": r.retired_at,
        "remove_after": r.remove_after,
    }


def _record(r: Row[Any]) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=r.kid,
        alg=r.alg,
        state=KeyState(r.state),
        public_jwk=dict(r.public_jwk),
        private_blob=bytes(r.private_blob) if r.private_blob is not None else None,
        created_at=r.created_at,
        activated_at=r.activated_at,
        retired_at=r.retired_at,
        remove_after=r.remove_after,
    )


class SqlKeyStore(SqlBase):
    unavailable_code = "key_store_unavailable"

    def list_keys(self) -> list[SigningKeyRecord]:
        with self._connection() as conn:
            rows = conn.execute(_ORDERED).all()
        return [_record(r) for r in rows]

    def put_key(self, record: SigningKeyRecord) -> None:
        self._insert(SIGNING_KEYS, _row(record), "signing key")

    def set_state(
        self,
        kid: str,
        state: KeyState,
        *,
        activated_at: float | None = None,
        retired_at: float | None = None,
        remove_after: float | None = None,
    ) -> None:
        values: dict[str, Any] = {"state": state.value}
        for name, value in (
            ("activated_at", activated_at),
            ("retired_at", retired_at),
            ("remove_after", remove_after),
        ):
            if value is not None:
                values[name] = value
        self._update(SIGNING_KEYS, "kid", kid, values, "signing key")

    def delete_key(self, kid: str) -> None:
        with self._connection() as conn:
            conn.execute(delete(SIGNING_KEYS).where(SIGNING_KEYS.c.kid == kid))

    def replace_all(self, records: Sequence[SigningKeyRecord]) -> None:
        """One transaction: the ring never appears half rotated to another process."""
        rows = _checked_rows(records)
        with self.atomic(), self._connection() as conn:
            _write(conn, rows)

    def update(
        self,
        change: Callable[[list[SigningKeyRecord]], Sequence[SigningKeyRecord] | None],
        *,
        events: Callable[[Sequence[SigningKeyRecord]], Sequence[Event]] | None = None,
    ) -> list[SigningKeyRecord]:
        """Read the ring, let ``change`` compute the next one (``None``: leave it), and write it,
        in one transaction that holds the ring's write lock from before the read.

        Two processes initialising or rotating at once then run one after the other and the
        second decides on what the first wrote; without the lock both would read the same ring
        and the later write would silently discard the earlier one's keys (tokens signed with a
        key that is then no longer published). Returns the ring as it is after the transaction.
        An exception from ``change`` rolls back and propagates."""
        # atomic() holds this store's write lock from before the read (SqlBase.atomic).
        with self.atomic(), self._connection() as conn:
            current = [_record(r) for r in conn.execute(_ORDERED).all()]
            records = change(list(current))
            if records is None:
                return current
            _write(conn, _checked_rows(records))
            for event in events(records) if events is not None else ():
                conn.execute(
                    insert(EVENTS).values(
                        id=event.id, at=event.at, type=event.type, actor=event.actor,
                        subject=event.subject, tenant_id=event.tenant_id, data=event.data,
                    )
                )  # fmt: skip
            return list(records)


def _checked_rows(records: Sequence[SigningKeyRecord]) -> list[dict[str, Any]]:
    rows = [_row(r) for r in records]
    for row in rows:
        check_values(SIGNING_KEYS, row, "signing key")
    return rows


def _write(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(delete(SIGNING_KEYS))
    if rows:
        conn.execute(insert(SIGNING_KEYS), rows)
