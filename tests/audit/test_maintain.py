"""Audit upkeep: the control plane signs checkpoints on its own; `aegis audit run` ships and prunes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aegis.audit.checkpoint import Checkpointer
from aegis.audit.log import AuditLog
from aegis.audit.maintain import AuditMaintainer
from aegis.cli.main import app
from aegis.clock import FrozenClock, random_bytes
from aegis.config import AuditSettings
from aegis.crypto.keyring import KeyRing
from tests.audit.conftest import ISSUER, fill
from tests.crypto.fakes import MemoryKeyStore
from tests.support.server import free_port, run_server, write_dev_config


def test_the_control_plane_checkpoints_periodically(tmp_path: Path) -> None:
    with run_server(tmp_path, "audit:\n  checkpoint_interval: 1\n") as srv:
        log = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        try:
            fill(log, 4)
            cp = Checkpointer(
                log, srv.services.keyring, issuer=srv.config.issuer, clock=srv.services.clock
            )
            deadline = time.monotonic() + 10
            while (latest := cp.latest()) is None or latest.tree_size < 4:
                assert time.monotonic() < deadline, "no checkpoint covering the records"
                time.sleep(0.1)
        finally:
            log.close()


def test_a_failing_step_is_logged_and_the_loop_goes_on(
    log: AuditLog, keyring: KeyRing, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    keyless = KeyRing(MemoryKeyStore(), random_bytes(32), clock)  # no active key: cannot sign
    settings = AuditSettings(checkpoint_interval=1)
    fill(log, 2)
    failing = AuditMaintainer(
        Checkpointer(log, keyless, issuer=ISSUER, clock=clock), settings, clock=clock
    )
    with caplog.at_level(logging.ERROR):
        failing.step()
    assert any(r.getMessage() == "audit.maintenance_failed" for r in caplog.records)
    working = Checkpointer(log, keyring, issuer=ISSUER, clock=clock)
    assert working.latest() is None
    maintainer = AuditMaintainer(working, settings, clock=clock)
    maintainer.step()
    latest = working.latest()
    assert latest is not None and latest.tree_size == 2
    maintainer.close()
    maintainer.step()  # after close: a no-op, not an error
    maintainer.close()


def test_audit_run_once_ships_to_jsonl_and_prunes(tmp_path: Path) -> None:
    config = write_dev_config(
        tmp_path,
        free_port(),
        "audit:\n  retention_days: 1\n  jsonl:\n    path: export/audit.jsonl\n",
    )
    runner = CliRunner()
    result = runner.invoke(app, ["--config", str(config), "audit", "run", "--once"])
    assert result.exit_code == 0, result.output
    from aegis.config import load_config
    from aegis.server.services import build_services

    services = build_services(load_config(config, environ={}))
    log = AuditLog(services.config.database_url(), clock=services.clock)
    try:
        fill(log, 3)
        result = runner.invoke(app, ["--config", str(config), "audit", "run", "--once"])
        assert result.exit_code == 0, result.output
        lines = (tmp_path / "export" / "audit.jsonl").read_text().splitlines()
        assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3]
        assert (tmp_path / ".aegis" / "audit-export" / "jsonl.cursor").exists()
        out = runner.invoke(app, ["--config", str(config), "audit", "prune", "--json"])
        assert (
            out.exit_code == 0 and json.loads(out.stdout)["deleted"] == 0
        )  # all younger than a day
    finally:
        log.close()
        import asyncio

        asyncio.run(services.aclose())


def test_retention_never_prunes_what_a_sink_has_not_received(
    log: AuditLog, keyring: KeyRing, clock: FrozenClock, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from aegis.audit.maintain import PRUNE_INTERVAL
    from aegis.audit.retention import prune
    from aegis.audit.ship import Shipper
    from aegis.audit.sinks import JsonlSink, OtlpSink

    cp = Checkpointer(log, keyring, issuer=ISSUER, clock=clock)
    fill(log, 4)
    cp.checkpoint()
    down = OtlpSink("http://127.0.0.1:9/v1/logs", timeout=1)  # refused: the sink is down
    lagging = Shipper(log, down, state_dir=tmp_path / "s", clock=clock)
    settings = AuditSettings(retention_days=1, checkpoint_interval=1)
    maintainer = AuditMaintainer(cp, settings, clock=clock, shippers=[lagging])
    clock.advance(3 * 86400)
    maintainer.step()
    assert log.count() == 4 and lagging.cursor == 0  # kept for the sink that is down
    maintainer.shippers = (
        Shipper(log, JsonlSink(tmp_path / "a.jsonl"), state_dir=tmp_path / "s", clock=clock),
    )
    maintainer.step()  # ships; pruning waits for its interval
    clock.advance(PRUNE_INTERVAL + 1)
    maintainer.step()
    assert log.count() == 0  # received everywhere, old and checkpointed: pruned
    down.close()
    # A shipper in another process that fell behind a prune says so.
    fill(log, 3, start=4)
    cp.checkpoint()
    clock.advance(3 * 86400)
    assert prune(log, before=clock.now()).upto == 7
    fill(log, 1, start=7)
    behind = Shipper(log, JsonlSink(tmp_path / "b.jsonl"), state_dir=tmp_path / "b", clock=clock)
    behind._advance(5)
    with caplog.at_level(logging.ERROR):
        assert behind.run_once().sent == 1
    assert any(r.getMessage() == "audit.export_gap" for r in caplog.records)
    # A sink starting afresh on the pruned log says where its copy starts.
    caplog.clear()
    fresh = Shipper(log, JsonlSink(tmp_path / "c.jsonl"), state_dir=tmp_path / "c", clock=clock)
    with caplog.at_level(logging.WARNING):
        assert fresh.run_once().sent == 1
    (gap,) = [r for r in caplog.records if r.getMessage() == "audit.export_gap"]
    assert gap.levelno == logging.WARNING
