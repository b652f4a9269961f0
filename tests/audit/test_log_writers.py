"""Appends from several writers onto one chain: each writer remembers the tail it last wrote, and
a tail another writer moved is found by the ``seq`` key, never forked or skipped."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from aegis.audit import log as audit_log
from aegis.audit.log import AuditLog, canonical_json, record_hash
from aegis.clock import FrozenClock, SystemClock
from aegis.errors import Unavailable
from aegis.telemetry.metrics import REGISTRY


def _pair(tmp_path: Path, clock: FrozenClock) -> tuple[AuditLog, AuditLog]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    return AuditLog(url, clock=clock), AuditLog(url, clock=clock)


def test_interleaved_writers_extend_one_chain(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000.0)
    a, b = _pair(tmp_path, clock)
    try:
        seen = []
        for i in range(20):
            writer = a if i % 3 else b  # runs of two by a, then one by b: stale tails both ways
            seen.append(writer.append("test", {"n": i}))
        assert [seq for seq, _ in seen] == list(range(1, 21))
        report = a.verify_chain()
        assert report.ok, report
        assert report.records == 20
        assert [r["n"] for r in a.records()] == list(range(20))
    finally:
        a.close()
        b.close()


def test_each_hash_continues_the_row_before_it(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000.0)
    a, b = _pair(tmp_path, clock)
    try:
        a.append("test", {"n": 0})
        b.append("test", {"n": 1})
        _, last = a.append("test", {"n": 2})  # a's remembered tail (seq 1) is stale
        with a.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT seq, prev_hash, hash, record FROM audit_records ORDER BY seq"
            ).all()
        assert [r[0] for r in rows] == [1, 2, 3]
        for before, row in itertools.pairwise(rows):
            assert row[1] == before[2]
            assert row[2] == record_hash(row[1], row[3])
        assert rows[-1][2] == last
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_group_commits_from_two_writers_interleave_without_loss(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000.0)
    a, b = _pair(tmp_path, clock)
    try:
        results = await asyncio.gather(
            *(w.append_async("test", {"n": i}) for i in range(60) for w in (a, b))
        )
        assert sorted(seq for seq, _ in results) == list(range(1, 121))
        assert a.verify_chain().ok
    finally:
        a.close()
        b.close()


def test_a_broken_writer_connection_fails_closed_then_recovers(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000.0)
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=clock)
    try:
        log.append("test", {"n": 0})
        log._writer().dbapi_connection.close()  # the connection dies under the writer
        with pytest.raises(Unavailable) as err:
            log.append("test", {"n": 1})
        assert err.value.code == "audit_unavailable"
        assert log.append("test", {"n": 2})[0] == 2  # a fresh connection, the chain goes on
        assert log.verify_chain().ok
        assert [r["n"] for r in log.records()] == [0, 2]
    finally:
        log.close()


@pytest.mark.postgres
def test_a_terminated_postgres_session_is_replaced_and_the_chain_goes_on(
    fresh_pg_url: str,
) -> None:
    """A session the server ended before a batch's commit was sent is replaced once; the batch
    is written on the fresh one, after whatever another writer appended meanwhile."""
    clock = FrozenClock(1_800_000_000.0)
    log = AuditLog(fresh_pg_url, clock=clock)
    other = AuditLog(fresh_pg_url, clock=clock)
    try:
        log.append("test", {"n": 0})
        pid = log._writer().dbapi_connection.info.backend_pid
        with other.engine.connect() as conn:  # as an operator or a failover would
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        other.append("test", {"n": 1})  # meanwhile another writer moves the tail
        assert log.append("test", {"n": 2})[0] == 3
        assert log.verify_chain().ok
        assert [r["n"] for r in log.records()] == [0, 1, 2]
    finally:
        log.close()
        other.close()


def _appends_in_thread_loop(log: AuditLog, start: int, n: int) -> list[tuple[int, str]]:
    async def run() -> list[tuple[int, str]]:
        return list(
            await asyncio.gather(*(log.append_async("t", {"n": start + i}) for i in range(n)))
        )

    return asyncio.run(run())


def test_one_writer_thread_serves_callers_on_several_event_loops(tmp_path: Path) -> None:
    """Callers on three loops (three threads) share one log: every record lands once, in one
    chain, and each caller learns its own position."""
    import concurrent.futures

    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            parts = list(pool.map(lambda s: _appends_in_thread_loop(log, s, 40), (0, 100, 200)))
        seqs = [seq for part in parts for seq, _ in part]
        assert sorted(seqs) == list(range(1, 121))
        by_seq = dict(zip(range(1, 121), log.records(), strict=True))
        for start, part in zip((0, 100, 200), parts, strict=True):
            assert [by_seq[seq]["n"] for seq, _ in part] == [start + i for i in range(40)]
        assert log.verify_chain().ok
    finally:
        log.close()


@pytest.mark.asyncio
async def test_the_writer_thread_leaves_when_idle_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "_WRITER_IDLE", 0.05)
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    try:
        assert (await log.append_async("t", {"n": 0}))[0] == 1
        deadline = time.monotonic() + 5
        while log._writer_running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not log._writer_running  # idle: gone
        assert (await log.append_async("t", {"n": 1}))[0] == 2  # started again on demand
        assert log.verify_chain().ok
    finally:
        log.close()


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dying_writer_thread_fails_its_waiters_and_the_next_append_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the writer thread itself break (not the database), nobody waits forever: the batch
    it held fails closed and the next append starts a new thread."""
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    real = log._write
    broken = [True]

    def write(batch: list) -> None:  # type: ignore[type-arg]
        if broken.pop() if broken else False:
            raise KeyboardInterrupt  # not an Exception: it escapes _write and ends the thread
        real(batch)

    monkeypatch.setattr(log, "_write", write)
    try:
        with pytest.raises(Unavailable) as err:
            await asyncio.wait_for(log.append_async("t", {"n": 0}), 5)
        assert err.value.code == "audit_unavailable"
        dying = log._thread
        assert dying is not None
        dying.join(5)  # it ends (with its error) within this test, not during the next one
        assert not dying.is_alive()
        assert (await asyncio.wait_for(log.append_async("t", {"n": 1}), 5))[0] == 1
        assert [r["n"] for r in log.records()] == [1]
    finally:
        log.close()


@pytest.mark.asyncio
async def test_a_cancelled_caller_still_leaves_its_record(tmp_path: Path) -> None:
    """Cancelling the wait does not take the record back: it is committed all the same, and the
    others in its batch are answered."""
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    try:
        first = asyncio.ensure_future(log.append_async("t", {"n": 0}))
        second = asyncio.ensure_future(log.append_async("t", {"n": 1}))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)[1]
        with pytest.raises(asyncio.CancelledError):
            await first
        deadline = time.monotonic() + 5
        while log.count() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(r["n"] for r in log.records()) == [0, 1]
    finally:
        log.close()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_two_postgres_writers_group_commit_onto_one_chain(fresh_pg_url: str) -> None:
    """Two logs on one PostgreSQL database (two replicas), each with its writer thread, appending
    concurrently: stale tails collide on ``seq`` and are retried, nothing forks or is lost."""
    clock = FrozenClock(1_800_000_000.0)
    a, b = AuditLog(fresh_pg_url, clock=clock), AuditLog(fresh_pg_url, clock=clock)
    try:
        results = await asyncio.gather(
            *(w.append_async("test", {"n": i, "w": name})
              for i in range(40) for name, w in (("a", a), ("b", b)))
        )  # fmt: skip
        assert sorted(seq for seq, _ in results) == list(range(1, 81))
        report = a.verify_chain()
        assert report.ok and report.records == 80, report
        seen = [(r["w"], r["n"]) for r in a.records()]
        for name in ("a", "b"):  # each writer's records keep their order
            assert [n for w, n in seen if w == name] == list(range(40))
    finally:
        a.close()
        b.close()


def _commits() -> tuple[float, float]:
    """(commits, records) the audit logs of this process have made so far."""
    count = REGISTRY.get_sample_value("aegis_audit_batch_records_count") or 0.0
    total = REGISTRY.get_sample_value("aegis_audit_batch_records_sum") or 0.0
    return count, total


@pytest.mark.asyncio
async def test_records_of_one_pass_of_the_loop_share_one_commit(tmp_path: Path) -> None:
    """Twenty calls decided in the same pass of the event loop, each doing work that lets other
    threads run (as socket writes do), are committed together: the writer thread is woken after
    the pass, not by each record while the others are still being decided."""
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    try:
        await log.append_async("t", {"n": -1})  # the writer thread is up and waiting

        async def decided(i: int) -> tuple[int, str]:
            time.sleep(0.002)  # the call's other work in this pass drops the GIL, as I/O does
            return await log.append_async("t", {"n": i})  # queued before its first await

        before = _commits()
        tasks = [asyncio.ensure_future(decided(i)) for i in range(20)]  # all run in one pass
        done = await asyncio.gather(*tasks)
        commits, records = (a - b for a, b in zip(_commits(), before, strict=True))
        assert records == 20
        assert commits <= 2
        assert sorted(seq for seq, _ in done) == list(range(2, 22))
        assert log.verify_chain().ok
    finally:
        log.close()


@pytest.mark.asyncio
async def test_a_wake_up_that_finds_the_batch_taken_does_not_end_the_writer(
    tmp_path: Path,
) -> None:
    """A writer woken after it already took the records (it was mid-commit when they came) goes
    back to waiting, rather than reading the empty queue as idle and leaving."""
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))
    try:
        await log.append_async("t", {"n": 0})
        writer = log._thread
        assert writer is not None
        for i in range(1, 30):
            await asyncio.gather(*(log.append_async("t", {"n": i * 10 + j}) for j in range(3)))
            log._kick(asyncio.get_running_loop())  # a late wake-up, with nothing queued
            await asyncio.sleep(0.001)
            assert log._writer_running
            assert writer.is_alive()
        assert log._thread is writer  # never replaced
        assert log.verify_chain().ok
    finally:
        log.close()


def test_close_lets_an_idle_writer_leave_at_once(tmp_path: Path) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000.0))

    async def one() -> None:
        await log.append_async("t", {"n": 0})

    asyncio.run(one())
    writer = log._thread
    assert writer is not None and writer.is_alive()
    log.close()
    writer.join(1.0)  # its idle wait is 5 s
    assert not writer.is_alive()


async def test_a_record_with_a_lone_surrogate_spoils_neither_itself_nor_its_batch(
    tmp_path: Path,
) -> None:
    """JSON "\\ud800" from a caller decodes to a string with no UTF-8 form. Its record is written
    with non-ASCII escaped (still one canonical text per record), and the records that share its
    group commit are written as well."""
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=SystemClock())
    try:
        odd = {"memo": "\ud800", "name": "Zoë"}
        results = await asyncio.gather(
            *(log.append_async("t", {"n": i}) for i in range(3)),
            log.append_async("t", odd),
            *(log.append_async("t", {"n": i}) for i in range(3, 6)),
        )
        assert [seq for seq, _ in results] == list(range(1, 8))
        assert canonical_json({**odd, "kind": "t"}).isascii()
        assert canonical_json({**odd, "kind": "t"}) == canonical_json({"kind": "t", **odd})
        assert log.verify_chain().ok
        assert [r for r in log.records() if "memo" in r] == [{**odd, "kind": "t"}]
    finally:
        log.close()
