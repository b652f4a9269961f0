"""Replicas appending to one PostgreSQL audit log: none is refused for losing a race, a stalled
table refuses within a bound instead of holding calls, and a connection the database dropped is
replaced without refusing the batch that finds it gone."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from aegis.errors import Unavailable
from tests.contracts.test_redis_recovery import Relay

pytestmark = [pytest.mark.postgres]


def test_replicas_appending_at_once_keep_one_chain_and_refuse_none(fresh_pg_url: str) -> None:
    """Before appends took a lock, the replica that lost the race for the next seq kept losing
    to the one whose tail was cached, and gave up: 3-11 % of calls refused audit_unavailable."""
    replicas, per = 3, 150
    logs = [AuditLog(fresh_pg_url, clock=SystemClock()) for _ in range(replicas)]
    refused: list[str] = []
    start = threading.Barrier(replicas)

    def replica(i: int) -> None:
        start.wait()
        for n in range(per):
            try:
                logs[i].append("gateway.decision", {"replica": i, "n": n})
            except Unavailable as exc:
                refused.append(exc.message)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not refused, f"{len(refused)} appends refused: {refused[0]}"
        assert logs[0].verify_chain().ok
        assert logs[0].count() == replicas * per
    finally:
        for log in logs:
            log.close()


async def test_a_stalled_table_refuses_within_a_bound(fresh_pg_url: str) -> None:
    """A lock held elsewhere (a consistent export) must not hold the gateway's calls without
    end: the append is refused audit_unavailable, and the next one after the stall succeeds."""
    log = await asyncio.to_thread(AuditLog, fresh_pg_url, clock=SystemClock())
    await log.append_async("gateway.decision", {"n": 1})
    url = make_url(fresh_pg_url)
    locker = psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
    started = time.monotonic()
    try:
        locker.execute("LOCK TABLE audit_records IN SHARE MODE")
        with pytest.raises(Unavailable) as exc:
            await asyncio.wait_for(log.append_async("gateway.decision", {"n": 2}), 10)
        assert exc.value.code == "audit_unavailable"
        assert time.monotonic() - started < 5
    finally:
        locker.rollback()
        locker.close()
    try:
        await log.append_async("gateway.decision", {"n": 3})
        assert (await asyncio.to_thread(log.verify_chain)).ok
    finally:
        await asyncio.to_thread(log.close)


async def test_the_first_append_after_the_database_returns_is_written(fresh_pg_url: str) -> None:
    """Every connection cut (a restart, a failover), then the database answers again: the kept
    writer connection is dead, and the batch that finds it so is written on a fresh one."""
    url = make_url(fresh_pg_url)
    relay = Relay(url.host or "127.0.0.1", url.port or 5432)
    await relay.start()
    via = url.set(host="127.0.0.1", port=relay.port).render_as_string(False)
    log = await asyncio.to_thread(AuditLog, via, clock=SystemClock())
    try:
        await log.append_async("gateway.decision", {"n": 1})
        await relay.stop()
        await relay.start()
        for n in range(2, 5):
            await log.append_async("gateway.decision", {"n": n})
        assert (await asyncio.to_thread(log.verify_chain)).ok
        assert await asyncio.to_thread(log.count) == 4
    finally:
        await asyncio.to_thread(log.close)
        await relay.stop()


def test_a_session_the_server_ended_is_replaced_without_refusing(fresh_pg_url: str) -> None:
    """pg_terminate_backend (a fast restart, most failovers) ends the session with 57P01, not a
    class-08 error: the batch that finds it so is written on a fresh connection."""
    log = AuditLog(fresh_pg_url, clock=SystemClock())
    url = make_url(fresh_pg_url)
    admin = psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                            autocommit=True)  # fmt: skip
    try:
        log.append("gateway.decision", {"n": 1})
        pid = log._raw.driver_connection.info.backend_pid
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        log.append("gateway.decision", {"n": 2})
        assert log.count() == 2 and log.verify_chain().ok
    finally:
        admin.close()
        log.close()


def test_a_failure_inside_an_append_never_leaves_the_lock_held(
    fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong after the append lock is taken, the connection holding it is closed:
    another replica's append does not wait for it."""
    one, two = (
        AuditLog(fresh_pg_url, clock=SystemClock()),
        AuditLog(fresh_pg_url, clock=SystemClock()),
    )
    try:
        one.append("gateway.decision", {"n": 1})

        def broken(rows: int) -> tuple[str, list[str] | None]:
            raise RuntimeError("a bug")

        monkeypatch.setattr(one, "_statement", broken)
        with pytest.raises(RuntimeError):
            one.append("gateway.decision", {"n": 2})
        monkeypatch.undo()
        started = time.monotonic()
        two.append("gateway.decision", {"n": 3})
        assert time.monotonic() - started < 1
        one.append("gateway.decision", {"n": 4})
        assert two.count() == 3 and two.verify_chain().ok
    finally:
        one.close()
        two.close()
