"""Tracing (OpenTelemetry API): the tracer every Aegis component uses.

Aegis only depends on the OpenTelemetry API at run time; the process that embeds it chooses the
SDK, exporters and sampling. :func:`set_tracer_provider` lets an application (or a test, with the
SDK's ``InMemorySpanExporter``) give Aegis its own provider without touching the global one, which
OpenTelemetry allows to be set only once per process.
"""

from __future__ import annotations

from typing import Final

from opentelemetry import trace

__all__ = ["INSTRUMENTATION_NAME", "get_tracer", "set_tracer_provider"]

INSTRUMENTATION_NAME: Final = "aegis"

_provider: trace.TracerProvider | None = None
#: The tracer of the provider in use, fetched once per provider: the gateway starts a span on every
#: call. The global provider's tracer is a proxy that follows a provider installed later.
_tracer: trace.Tracer | None = None


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Use ``provider`` for Aegis spans; None returns to the global provider."""
    global _provider, _tracer
    _provider, _tracer = provider, None


def get_tracer() -> trace.Tracer:
    """The Aegis tracer: from the provider set here, else the global (no-op by default) one."""
    global _tracer
    tracer = _tracer
    if tracer is None:
        if _provider is not None:
            tracer = _provider.get_tracer(INSTRUMENTATION_NAME)
        else:
            tracer = trace.get_tracer(INSTRUMENTATION_NAME)
        _tracer = tracer
    return tracer
