"""A batch whose commit reached the server but whose reply was lost is an append that succeeded:
the log is asked on a fresh connection whether the batch is there, once the lost transaction has
ended (its append lock is taken first). It was reported "not
written" (``audit_unavailable``, the call refused 503) although its decision record, an
``allow`` say, was in the log with nothing after it to say the call was never forwarded.
"""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock

pytestmark = [pytest.mark.postgres]


class CommitCutter:
    """TCP relay to PostgreSQL that, once armed, forwards a COMMIT and then cuts the connection
    before the server's answer reaches the client (the answer lost, the commit done)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            cut = threading.Event()  # this connection's: a new one relays both ways
            threading.Thread(target=self._up, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.armed.is_set() and b"COMMIT\x00" in data:
                    self.armed.clear()
                    cut.set()  # from now on nothing goes back to this client
                    self.cut.set()
                    upstream.sendall(data)
                    time.sleep(0.3)  # the server commits; its answer is not passed on
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    return
                upstream.sendall(data)
        except OSError:
            pass

    def _down(self, upstream: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if cut.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass


def test_an_append_whose_commit_reply_is_lost_is_settled_by_the_log(fresh_pg_url: str) -> None:
    url = make_url(fresh_pg_url)
    relay = CommitCutter(url.host or "127.0.0.1", url.port or 5432)
    via = url.set(host="127.0.0.1", port=relay.port, query={"sslmode": "disable"})
    log = AuditLog(via.render_as_string(hide_password=False), clock=SystemClock())
    direct = AuditLog(fresh_pg_url, clock=SystemClock())
    try:
        log.append("gateway.decision", {"decision_id": "d-1", "action": "allow"})
        relay.armed.set()
        seq, _ = log.append("gateway.decision", {"decision_id": "d-2", "action": "allow"})
        assert relay.cut.is_set()
        assert [r["decision_id"] for r in direct.records()] == ["d-1", "d-2"]
        assert seq == 2 and direct.verify_chain().ok
        assert log.append("gateway.decision", {"decision_id": "d-3"})[0] == 3
    finally:
        log.close()
        direct.close()
        relay.server.close()


class FastCutter(CommitCutter):
    """Cuts the client right after the COMMIT is forwarded (the reply is lost at once)."""

    def _up(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
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


def test_a_lost_reply_to_a_commit_still_in_flight_is_settled_once_it_ends(
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
        log.append("gateway.decision", {"decision_id": "d-0"})  # the writer connection is set up
        relay.armed.set()
        # Before, the log was read at once, before the commit had ended: the call was refused
        # as unrecorded, and moments later its record was in the log.
        assert log.append("gateway.decision", {"decision_id": "d-1", "action": "allow"})[0] == 2
        assert relay.cut.is_set()
        assert [r["decision_id"] for r in direct.records()] == ["d-0", "d-1"]
    finally:
        log.close()
        direct.close()
        relay.server.close()
