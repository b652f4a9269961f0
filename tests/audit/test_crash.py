"""``kill -9`` of a real gateway process under load loses no acknowledged decision.

The gateway runs as its own process (``aegis gateway run``) on SQLite. Client threads call a route
in a bounded loop and keep the decision id of every response they receive (each answer, allow or
refusal, is a decision with an audit record). The process is killed with SIGKILL mid-load; every
acknowledged decision id must then be in the audit log, and the chain must verify.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from tests.support.server import free_port, write_dev_config

pytestmark = pytest.mark.slow


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"gateway exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("gateway did not start")


def test_kill_9_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    gw_port = free_port()
    config = write_dev_config(
        tmp_path,
        free_port(),
        f"gateway:\n  port: {gw_port}\n  routes:\n"
        "    - {path_prefix: /tool, upstream: 'http://127.0.0.1:9', tool: t, tenant: acme, env: prod}\n",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aegis.cli.main",
            "gateway",
            "run",
            "--config",
            str(config),
            "--local-stores",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{gw_port}"
    acked: list[str] = []
    lock = threading.Lock()
    try:
        _wait_ready(url, proc)

        def client() -> None:
            with httpx.Client(timeout=2.0) as c:
                for _ in range(150):
                    try:
                        r = c.get(f"{url}/tool/call")
                    except httpx.HTTPError:
                        return  # the gateway is gone: nothing more is acknowledged
                    decision = r.headers.get("x-aegis-decision-id")
                    assert decision is not None, r.text
                    with lock:
                        acked.append(decision)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60  # generous: CI machines are shared
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-load, requests in flight
        for t in threads:
            t.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 10, "the load loop never got going"
    log = AuditLog(f"sqlite:///{tmp_path / '.aegis' / 'aegis.db'}", clock=SystemClock())
    try:
        recorded = {r["decision_id"] for r in log.records(kind="gateway.decision")}
        assert set(acked) <= recorded, f"{len(set(acked) - recorded)} acknowledged decisions lost"
        assert log.verify_chain().ok
    finally:
        log.close()
