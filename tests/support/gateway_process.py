"""``aegis gateway run`` as a child process of a test: started with a config and environment,
stopped with SIGTERM (and killed, reported, if SIGTERM does not stop it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def start_gateway(
    config: Path,
    environ: dict[str, str],
    log: Path,
    *,
    port: int | None = None,
    local_stores: bool = False,
) -> subprocess.Popen[bytes]:
    """``aegis gateway run --config config`` (``--port`` when given, ``--local-stores`` for
    memory:// stores), with ``environ`` over this process's environment, its output in ``log``."""
    args = [sys.executable, "-m", "aegis.cli.main", "gateway", "run", "--config", str(config)]
    if port is not None:
        args += ["--port", str(port)]
    if local_stores:
        args.append("--local-stores")
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=config.parent,
            env={**os.environ, **environ},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_gateway(proc: subprocess.Popen[bytes], within: float = 15.0) -> bool:
    """SIGTERM, and True once it has stopped within ``within`` seconds; else kill it and return
    False (the caller asserts: a gateway that ignores SIGTERM is a defect)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return False
    return True
