"""Building the configured shippers (``audit.jsonl``, ``audit.syslog``, ``audit.otlp``)."""

from __future__ import annotations

from aegis.audit.log import AuditLog
from aegis.audit.ship import Shipper, Sink
from aegis.audit.sinks import JsonlSink, OtlpSink, SyslogSink
from aegis.clock import Clock
from aegis.config import AegisConfig

__all__ = ["build_shippers", "build_sinks"]


def build_sinks(config: AegisConfig) -> list[Sink]:
    a = config.audit
    sinks: list[Sink] = []
    if a.jsonl is not None:
        sinks.append(JsonlSink(config.path(a.jsonl.path), max_bytes=a.jsonl.max_bytes))
    if a.syslog is not None:
        s = a.syslog
        ctx = SyslogSink.context(
            str(config.path(s.ca_file)),
            str(config.path(s.cert_file)) if s.cert_file else None,
            str(config.path(s.key_file)) if s.key_file else None,
        )
        sinks.append(
            SyslogSink(
                s.host,
                s.port,
                context=ctx,
                server_name=s.server_name,
                app_name=s.app_name,
                timeout=s.connect_timeout,
            )
        )
    if a.otlp is not None:
        sinks.append(OtlpSink(a.otlp.endpoint, headers=a.otlp.headers, timeout=a.otlp.timeout))
    return sinks


def build_shippers(log: AuditLog, config: AegisConfig, *, clock: Clock) -> list[Shipper]:
    a = config.audit
    return [
        Shipper(
            log,
            sink,
            state_dir=config.path(a.state_dir),
            clock=clock,
            batch_size=a.batch_size,
            retry_initial=a.retry_initial,
            retry_max=a.retry_max,
            max_attempts=a.max_attempts,
        )
        for sink in build_sinks(config)
    ]
