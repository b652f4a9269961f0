"""``_committed`` settles a lost commit reply by reading the log on another connection, without
waiting for the lost transaction to end. A commit that is still being made when the reply is lost
(the server has the COMMIT, the row is not visible yet) reads as "not there": the call is refused
as unrecorded, and moments later its record is in the log. The append lock, which the in-flight
transaction holds until its commit ends, is not taken to wait for it."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from aegis.errors import Unavailable
from tests.audit.test_in_doubt_commit_pg import CommitCutter

pytestmark = [pytest.mark.postgres]


class FastCutter(CommitCutter):
    """Cuts the client right after the COMMIT is forwarded (the reply is lost at once)."""

    def _up(self, client, upstream, cut):  # type: ignore[no-untyped-def]
        try:
            while data := client.recv(65536):
                if self.armed.is_set() and b"COMMIT\x00" in data:
                    self.armed.clear()
                    cut.set()
                    self.cut.set()
                    upstream.sendall(data)
                    time.sleep(0.05)
                    client.shutdown(2)
                    client.close()
                    return
                upstream.sendall(data)
        except OSError:
            pass


def test_committed_does_not_wait_for_a_commit_in_flight_and_refuses_a_recorded_call(
    empty_pg_url: str,
) -> None:
    direct = AuditLog(empty_pg_url, clock=SystemClock())
    u = make_url(empty_pg_url)
    # A commit that takes a moment to become visible (as a slow WAL flush or a synchronous
    # standby makes it): a deferred constraint trigger, in this test's own database only.
    with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username,
                         dbname=u.database, autocommit=True) as conn:  # fmt: skip
        conn.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON audit_records "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )
    relay = FastCutter(u.host or "127.0.0.1", u.port or 5432)
    via = u.set(host="127.0.0.1", port=relay.port, query={"sslmode": "disable"})
    log = AuditLog(via.render_as_string(hide_password=False), clock=SystemClock())
    try:
        relay.armed.set()
        refused = None
        try:
            log.append("gateway.decision", {"decision_id": "d-1", "action": "allow"})
        except Unavailable as exc:
            refused = exc
        assert relay.cut.is_set()
        time.sleep(3)  # the in-flight commit ends
        stored = [r["decision_id"] for r in direct.records()]
        assert not (refused is not None and stored == ["d-1"]), (
            "the call was refused as unrecorded (audit_unavailable), yet its record is in the "
            "log: _committed read before the lost transaction's commit had ended"
        )
    finally:
        log.close()
        direct.close()
        relay.server.close()
