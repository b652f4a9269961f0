"""The data plane: one decision pipeline (``pipeline``) behind every front door (``proxy``)."""

from __future__ import annotations

from aegis.gateway.context import CallContext, Route, body_digest
from aegis.gateway.pipeline import Pipeline, Result

__all__ = ["CallContext", "Pipeline", "Result", "Route", "body_digest"]
