"""Audit export sinks: JSON Lines files, syslog over TLS (RFC 5424/5425), OTLP/HTTP logs."""

from __future__ import annotations

from aegis.audit.sinks.jsonl import JsonlSink
from aegis.audit.sinks.otlp import OtlpSink
from aegis.audit.sinks.syslog import SyslogSink, format_5424

__all__ = ["JsonlSink", "OtlpSink", "SyslogSink", "format_5424"]
