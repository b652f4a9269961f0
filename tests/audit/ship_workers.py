"""Worker processes for the shipping tests (importable for multiprocessing spawn)."""

from __future__ import annotations

from typing import Any


def jsonl_partial_write(url: str, path: str, state_dir: str, limit: int, results: Any) -> None:
    """Ship to a JSON Lines sink while the file may not grow past ``limit`` bytes (a full disk,
    a quota), then with the limit lifted; report both outcomes. A process of its own: the file
    size limit is the whole process's."""
    import resource
    import signal
    from pathlib import Path

    from aegis.audit.log import AuditLog
    from aegis.audit.ship import Shipper
    from aegis.audit.sinks import JsonlSink
    from aegis.clock import FrozenClock

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    clock = FrozenClock(1_800_000_000.0)
    log = AuditLog(url, clock=clock)
    shipper = Shipper(log, JsonlSink(Path(path)), state_dir=Path(state_dir), clock=clock)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    first = shipper.run_once()
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    clock.advance(60)
    second = shipper.run_once()
    results.put((first.down, first.sent, second.down, second.sent, shipper.cursor))
    log.close()
