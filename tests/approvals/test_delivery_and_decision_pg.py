"""The notifier's delivery record and an approver's decision, on two replicas sharing
PostgreSQL, each keep their own fields. ``set_delivery`` read a request's JSON body and wrote it
whole back, so a decision committed in between lost its channel and reason; and ``transition``
wrote every column from the decider's earlier read, so the delivery outcome recorded meanwhile
went back to its old value. Both now read and write under the row's lock, and a transition keeps
the stored delivery outcome. Interleavings fixed with SQLAlchemy hooks and threads."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from sqlalchemy import event

from aegis.approvals.model import ApprovalRequest
from aegis.approvals.store import SqlApprovalStore


def _request() -> ApprovalRequest:
    return ApprovalRequest(
        id="apr_1", state="pending", tenant="acme", env="prod", agent_id="payer",
        agent_owner="o@example.com", tool="payments", method="POST", path="/payments/charge",
        digest="sha256:" + "aa" * 32, parameters={"amount": 12000}, rule_ids=("pay-large",),
        group="finance", channel="slack", created_at=100.0, expires_at=700.0, decision_id="d1",
    )  # fmt: skip


def _approved(req: ApprovalRequest) -> ApprovalRequest:
    return dataclasses.replace(
        req, state="approved", decided_by="carol@example.com", decided_at=150.0,
        decided_via="slack", decision_reason="ok, one-off refund", override_expires_at=270.0,
    )  # fmt: skip


def test_delivery_record_overlapping_a_decision_erases_the_decisions_reason(
    fresh_pg_url: str,
) -> None:
    store = SqlApprovalStore(fresh_pg_url)
    decider = SqlApprovalStore(fresh_pg_url)  # another replica
    try:
        req, _ = store.insert_or_open(_request())
        fired, decided = threading.Event(), threading.Event()
        outcome: list[bool] = []

        def decide() -> None:
            outcome.append(decider.transition(_approved(req), "pending"))
            decided.set()

        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Right after set_delivery's SELECT, an approver decides on another replica. Before,
            # the decision committed here and set_delivery then wrote the old body back; now it
            # waits for the row's lock, which set_delivery holds until it commits.
            if (
                statement.lstrip().upper().startswith("SELECT")
                and not fired.is_set()
                and threading.current_thread().name == "delivery"
            ):
                fired.set()
                threading.Thread(target=decide, daemon=True).start()
                decided.wait(0.5)  # unlocked, the decision commits meanwhile

        event.listen(store._engine, "after_cursor_execute", after)
        delivered = dataclasses.replace(req, notify_state="delivered", notify_attempts=1)
        worker = threading.Thread(target=store.set_delivery, args=(delivered,), name="delivery")
        worker.start()
        worker.join(10)
        assert fired.is_set() and decided.wait(10) and outcome == [True]
        now = decider.get("apr_1")
        assert now is not None and now.state == "approved"
        assert (now.decided_via, now.decision_reason) == ("slack", "ok, one-off refund"), (
            "the committed decision's channel and reason were overwritten by set_delivery"
        )
        assert (now.notify_state, now.notify_attempts) == ("delivered", 1)
    finally:
        store.close()
        decider.close()


def test_decision_taken_on_an_earlier_read_undoes_the_recorded_delivery(
    fresh_pg_url: str,
) -> None:
    store = SqlApprovalStore(fresh_pg_url)
    try:
        store.insert_or_open(_request())
        read = store.get("apr_1")  # ApprovalService.decide reads the request (in _decider) ...
        assert read is not None
        # ... meanwhile the notifier finishes and records the delivery ...
        store.set_delivery(dataclasses.replace(read, notify_state="failed", notify_attempts=3,
                                               notify_error="slack answered 500"))  # fmt: skip
        # ... and the decision writes every column from its earlier read.
        assert store.transition(_approved(read), "pending")
        now = store.get("apr_1")
        assert now is not None
        assert (now.notify_state, now.notify_attempts, now.notify_error) == (
            "failed",
            3,
            "slack answered 500",
        ), "the recorded delivery outcome was reverted by the decision's write"
    finally:
        store.close()
