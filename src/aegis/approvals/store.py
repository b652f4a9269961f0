"""The approval store: requests in SQL (SQLite embedded, PostgreSQL shared by replicas).

Every state change is one guarded ``UPDATE ... WHERE id = :id AND state = :from`` and reports
whether it happened, so two approvers (or two replicas) racing on one request cannot both win.
SQL failures are ``Unavailable`` with code ``approvals_unavailable``: the gateway then refuses the
call (fail closed), it never lets it through.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Final

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from aegis.approvals.model import (
    APPROVAL_ID,
    OPEN_STATES,
    UNRECORDED_AFTER,
    ApprovalRequest,
    State,
)
from aegis.approvals.sql_tables import APPROVAL_REQUESTS, METADATA
from aegis.errors import Unavailable
from aegis.stores.sql.engine import create_tables, lock_transaction, make_engine

__all__ = ["SqlApprovalStore"]

T: Final = APPROVAL_REQUESTS
_COLUMNS: Final = (
    "id", "state", "digest", "tenant", "env", "agent_id", "agent_owner", "tool", "created_at",
    "expires_at", "decided_at", "decided_by", "override_expires_at", "notify_state",
    "notify_attempts",
)  # fmt: skip
_BODY: Final = (
    "method", "path", "parameters", "rule_ids", "channel", "decision_id", "chain", "origin_user",
    "origin_iss", "policy_version", "reasons", "decided_via", "decision_reason", "notify_error", "query",
    "headers", "chain_owners",
)  # fmt: skip
_TUPLES: Final = frozenset({"rule_ids", "chain", "reasons", "chain_owners"})
_PAIRS: Final = frozenset({"query", "headers"})


def _unavailable() -> Unavailable:
    return Unavailable("the approval store cannot answer", code="approvals_unavailable")


def _row(req: ApprovalRequest) -> dict[str, Any]:
    row = {c: getattr(req, c) for c in _COLUMNS}
    row["grp"] = req.group
    row["channel"] = req.channel
    row["open_digest"] = req.digest if req.is_open else None
    body = {k: getattr(req, k) for k in _BODY}
    row["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"), default=list)
    return row


def _request(row: Any) -> ApprovalRequest:
    m = row._mapping
    body = json.loads(m["body"])
    fields = {c: m[c] for c in _COLUMNS}
    for k, v in body.items():
        if k in _PAIRS:
            fields[k] = tuple((str(name), str(value)) for name, value in v)
        elif k in _BODY:
            fields[k] = tuple(v) if k in _TUPLES else v
    return ApprovalRequest(group=m["grp"], **fields)


def _row_lock(request_id: str) -> int:
    """The lock key of one request's row: its read-modify-writes run one at a time (PostgreSQL,
    a transaction-level advisory lock; SQLite, the database's write lock)."""
    return zlib.crc32(f"aegis:approval:{request_id}".encode())


class SqlApprovalStore:
    def __init__(self, engine: Engine | str) -> None:
        self._engine = make_engine(engine) if isinstance(engine, str) else engine
        try:
            create_tables(METADATA, self._engine)
        except SQLAlchemyError as exc:
            raise _unavailable() from exc

    def close(self) -> None:
        self._engine.dispose()

    def insert_or_open(self, req: ApprovalRequest) -> tuple[ApprovalRequest, bool]:
        """Store ``req``; if a request for the same digest is already open return that one
        instead. Returns ``(request, created)``."""
        for _ in range(2):  # the open one may close between the refused insert and the read
            try:
                with self._engine.begin() as conn:
                    conn.execute(insert(T).values(**_row(req)))
                return req, True
            except IntegrityError:
                found = self.open_for(req.digest)
                if found is not None:
                    return found, False
            except SQLAlchemyError as exc:
                raise _unavailable() from exc
        raise _unavailable()

    def get(self, approval_id: str) -> ApprovalRequest | None:
        if not APPROVAL_ID.fullmatch(approval_id):
            # No request has such an id; asked, PostgreSQL refuses a NUL, read as an outage.
            return None
        return self._one(select(T).where(T.c.id == approval_id))

    def open_for(self, digest: str) -> ApprovalRequest | None:
        return self._one(select(T).where(T.c.open_digest == digest))

    def _one(self, query: Any) -> ApprovalRequest | None:
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError as exc:
            raise _unavailable() from exc
        return _request(row) if row is not None else None

    def list_requests(
        self, *, state: State | None = None, limit: int = 200
    ) -> list[ApprovalRequest]:
        query = select(T).order_by(T.c.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(T.c.state == state)
        try:
            with self._engine.connect() as conn:
                return [_request(r) for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise _unavailable() from exc

    def due(self, now: float) -> list[ApprovalRequest]:
        """Open requests past their time: pending past ``expires_at``, approved past the
        override window, and one still waiting for its audit record ``UNRECORDED_AFTER``
        seconds after the change (its process stopped before moving it on)."""
        stuck = now - UNRECORDED_AFTER
        query = select(T).where(
            ((T.c.state == "pending") & (T.c.expires_at <= now))
            | ((T.c.state == "approved") & (T.c.override_expires_at <= now))
            | ((T.c.state == "recording") & (T.c.created_at <= stuck))
            | ((T.c.state == "approving") & (T.c.decided_at <= stuck))
        )
        try:
            with self._engine.connect() as conn:
                return [_request(r) for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise _unavailable() from exc

    def count_pending(self) -> int:
        query = select(func.count()).select_from(T).where(T.c.state == "pending")
        try:
            with self._engine.connect() as conn:
                return int(conn.execute(query).scalar_one())
        except SQLAlchemyError as exc:
            raise _unavailable() from exc

    def transition(self, req: ApprovalRequest, expected: State) -> bool:
        """Write ``req`` (whose state is the new one) if the stored state is still
        ``expected``; False when someone else changed it first. The delivery outcome is
        :meth:`set_delivery`'s and is kept as stored: ``req`` was read before it may have been
        recorded, and would write it back."""
        row = _row(req)
        row.pop("id")
        if req.state not in OPEN_STATES:
            row["open_digest"] = None
        try:
            with self._engine.begin() as conn:
                lock_transaction(conn, _row_lock(req.id))
                current = conn.execute(select(T).where(T.c.id == req.id)).first()
                if current is None or current._mapping["state"] != expected:
                    return False
                stored = current._mapping
                row["notify_state"] = stored["notify_state"]
                row["notify_attempts"] = stored["notify_attempts"]
                body = json.loads(row["body"])
                body["notify_error"] = json.loads(stored["body"]).get("notify_error")
                row["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
                done = conn.execute(
                    update(T).where(T.c.id == req.id, T.c.state == expected).values(**row)
                )
            return bool(done.rowcount == 1)
        except SQLAlchemyError as exc:
            raise _unavailable() from exc

    def set_delivery(self, req: ApprovalRequest) -> None:
        """Record the notification outcome (state-independent fields only), read and written
        under the row's lock: a decision committed meanwhile keeps its own fields."""
        try:
            with self._engine.begin() as conn:
                lock_transaction(conn, _row_lock(req.id))
                current = conn.execute(select(T).where(T.c.id == req.id)).first()
                if current is None:
                    return
                body = json.loads(current._mapping["body"])
                body["notify_error"] = req.notify_error
                conn.execute(
                    update(T)
                    .where(T.c.id == req.id)
                    .values(
                        notify_state=req.notify_state,
                        notify_attempts=req.notify_attempts,
                        body=json.dumps(body, sort_keys=True, separators=(",", ":")),
                    )
                )
        except SQLAlchemyError as exc:
            raise _unavailable() from exc
