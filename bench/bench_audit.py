"""Audit log: durable appends per second (SQLite, PostgreSQL) and inclusion-proof time at 1M records.

Appends: ``AuditLog.append`` (one commit per record, each durable before it returns: SQLite WAL with
``synchronous=FULL``, PostgreSQL with its default ``synchronous_commit``) and ``append_async`` with
``--concurrency`` callers (group commit: records that arrive during a commit share the next one).

Proofs: a Merkle tree of ``--records`` leaves (default one million) is written to
``audit_tree_nodes`` in bulk (the same rows ``MerkleStore.sync`` writes), then ``--proofs`` inclusion
proofs for random leaves are read from SQLite and each is verified against the root. Goal: a proof in
under 10 ms at one million records. Wall time; a shared machine makes every figure noisy.

    .venv/bin/python bench/bench_audit.py [--appends 300] [--records 1000000] [--proofs 200]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from aegis.audit.log import AuditLog
from aegis.audit.merkle import root_of, verify_inclusion
from aegis.audit.sql_tables import AUDIT_TREE_NODES, METADATA
from aegis.audit.tree import MerkleStore
from aegis.clock import SystemClock
from aegis.stores.sql.engine import make_engine

RECORD = {"decision_id": "d", "agent_id": "finance-agent", "tool": "payments", "action": "allow"}


def _appends(log: AuditLog, n: int, concurrency: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for i in range(n):
        log.append("bench", {**RECORD, "n": i})
    serial = n / (time.perf_counter() - t0)

    async def burst() -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await log.append_async("bench", {**RECORD, "n": i})

        await asyncio.gather(*(one(i) for i in range(n * 4)))

    t0 = time.perf_counter()
    asyncio.run(burst())
    grouped = n * 4 / (time.perf_counter() - t0)
    assert log.verify_chain().ok
    return serial, grouped


def scratch_pg_database(url: str) -> str:
    """A new, empty database beside ``url``'s (dropped by :func:`drop_pg_database`): the bench
    leaves nothing in the database it was pointed at."""
    admin = make_engine(url)
    name = f"aegis_bench_{random.getrandbits(32):08x}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str, scratch: str) -> None:
    admin = make_engine(url)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _pg_log(url: str) -> AuditLog:
    return AuditLog(scratch_pg_database(url), clock=SystemClock())


def _drop_pg(url: str, log: AuditLog) -> None:
    scratch = log.engine.url.render_as_string(hide_password=False)
    log.close()
    drop_pg_database(url, scratch)


def _build_tree(path: Path, n: int) -> tuple[MerkleStore, list[bytes], bytes]:
    """The rows ``MerkleStore.sync`` would write for ``n`` leaves, level by level, in bulk."""
    engine = make_engine(f"sqlite:///{path}")
    METADATA.create_all(engine)
    leaves = [hashlib.sha256(b"\x00" + i.to_bytes(8, "big")).digest() for i in range(n)]
    level, nodes = 0, leaves
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA synchronous=OFF")  # a scratch file: no need to wait for disk
        while nodes:
            conn.exec_driver_sql(
                f"INSERT INTO {AUDIT_TREE_NODES.name} (level, idx, hash) VALUES (?, ?, ?)",
                [(level, i, h) for i, h in enumerate(nodes)],
            )
            nodes = [
                hashlib.sha256(b"\x01" + nodes[i] + nodes[i + 1]).digest()
                for i in range(0, len(nodes) - 1, 2)
            ]
            level += 1
    store = MerkleStore(make_engine(f"sqlite:///{path}"))
    return store, leaves, store.root(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=200)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(f"sqlite:///{Path(tmp) / 'audit.db'}", clock=SystemClock())
        serial, grouped = _appends(log, args.appends, args.concurrency)
        log.close()
        print(
            f"sqlite      durable appends: {serial:8.0f}/s one at a time, {grouped:8.0f}/s grouped"
        )
        if not args.no_pg:
            pg = _pg_log(args.pg)
            try:
                serial, grouped = _appends(pg, args.appends, args.concurrency)
            finally:
                _drop_pg(args.pg, pg)
            print(
                f"postgresql  durable appends: {serial:8.0f}/s one at a time, {grouped:8.0f}/s grouped"
            )

        t0 = time.perf_counter()
        store, leaves, root = _build_tree(Path(tmp) / "tree.db", args.records)
        print(f"tree of {args.records} leaves written in {time.perf_counter() - t0:.1f}s")
        if args.records <= 100_000:  # cross-check the stored tree against the definition
            assert root == root_of(leaves)
        rng = random.Random(7)
        times = []
        for _ in range(args.proofs):
            index = rng.randrange(args.records)
            t0 = time.perf_counter()
            path = store.inclusion(index, args.records)
            times.append(time.perf_counter() - t0)
            verify_inclusion(leaves[index], index, args.records, path, root)
        times.sort()
        print(
            f"inclusion proof at {args.records} records: median {statistics.median(times) * 1e3:.2f} ms, "
            f"p99 {times[int(len(times) * 0.99) - 1] * 1e3:.2f} ms (goal < 10 ms), "
            f"{len(path)} hashes"
        )


if __name__ == "__main__":
    main()
