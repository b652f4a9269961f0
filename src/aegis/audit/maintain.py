"""Periodic audit upkeep: signed checkpoints, retention and (optionally) shipping to sinks.

The control plane (``aegis up``) runs :meth:`AuditMaintainer.forever` in its lifespan for
checkpoints and retention; ``aegis audit run`` runs the same loop with the configured shippers.
Several processes may checkpoint and prune the same database: both are idempotent and a checkpoint
of a size another process already stored is kept as theirs. Shipping needs exactly one process per
sink cursor, which is why only ``aegis audit run`` ships.

Every step runs off the event loop, and a failing step (database down, no active signing key) is
logged and retried at the next tick; it never stops the loop or touches the decision path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Final

from aegis.audit.checkpoint import Checkpointer
from aegis.audit.log import AuditLog
from aegis.audit.retention import prune
from aegis.audit.ship import Shipper
from aegis.clock import Clock
from aegis.config import AegisConfig, AuditSettings
from aegis.crypto.keyring import KeyRing
from aegis.errors import AegisError
from aegis.telemetry.logging import log_event

__all__ = ["AuditMaintainer"]

#: How often the loop wakes up to ship (checkpoints and pruning follow their own intervals).
TICK: Final = 0.5
#: Retention is applied at most this often (seconds).
PRUNE_INTERVAL: Final = 3600.0


class AuditMaintainer:
    def __init__(
        self,
        checkpointer: Checkpointer,
        settings: AuditSettings,
        *,
        clock: Clock,
        shippers: Sequence[Shipper] = (),
    ) -> None:
        self.checkpointer, self.settings, self.shippers = checkpointer, settings, tuple(shippers)
        self._clock = clock
        self._next_checkpoint = 0.0
        self._next_prune = 0.0
        # close() waits for a step still running in its worker thread before closing the log.
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def for_control_plane(
        cls, config: AegisConfig, keyring: KeyRing, *, clock: Clock
    ) -> AuditMaintainer:
        """Checkpoints and retention on the configured database, no shipping."""
        log = AuditLog(config.database_url(), clock=clock)
        return cls(
            Checkpointer(log, keyring, issuer=config.evidence_issuer(), clock=clock),
            config.audit,
            clock=clock,
        )

    def step(self) -> None:
        """One pass: whatever is due. Errors are logged, never raised."""
        with self._lock:
            if not self._closed:
                self._step()

    def _step(self) -> None:
        now = self._clock.now()
        if now >= self._next_checkpoint:
            self._guard("checkpoint", self.checkpointer.checkpoint)
            self._next_checkpoint = now + self.settings.checkpoint_interval
        if self.settings.retention_days > 0 and now >= self._next_prune:
            cutoff = now - self.settings.retention_days * 86400
            # Never prune what a sink of this process has not received yet.
            shipped = min((sh.cursor for sh in self.shippers), default=None)
            self._guard(
                "prune",
                lambda: prune(
                    self.checkpointer.log,
                    before=cutoff,
                    at_most=shipped,
                    verify=self.checkpointer.verify_stored,
                ),
            )
            self._next_prune = now + PRUNE_INTERVAL
        for shipper in self.shippers:
            self._guard("ship", shipper.run_once)

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (AegisError, OSError, ValueError) as exc:
            log_event(
                "audit.maintenance_failed",
                level=logging.ERROR,
                step=what,
                error=getattr(exc, "code", type(exc).__name__),
            )
        except Exception as exc:  # a bug: loud in the log, but upkeep goes on
            log_event(
                "audit.maintenance_failed", level=logging.ERROR, step=what, error=type(exc).__name__
            )

    async def forever(self, *, tick: float = TICK) -> None:
        while True:
            await asyncio.to_thread(self.step)
            await asyncio.sleep(tick)

    def close(self) -> None:
        """Close the sinks and the log (after any step in flight)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for shipper in self.shippers:
                shipper.sink.close()
            self.checkpointer.log.close()
