"""Structured logs: one JSON object per line, fields named by constants, never a secret.

Use :func:`log_event` with keyword fields; never format values into the message. Token values,
secrets and assertions must not be passed at all: log a ``jti`` or a ``client_id`` instead.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = [
    "QueryStringFilter",
    "configure_logging",
    "hide_access_log_queries",
    "log_event",
    "logger",
]

logger = logging.getLogger("aegis")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "aegis_fields", {})
        return json.dumps(
            {"level": record.levelname.lower(), "event": record.getMessage(), **fields},
            default=str,
            separators=(",", ":"),
        )


class QueryStringFilter(logging.Filter):
    """Drop the query string from uvicorn access-log lines.

    A client may put a token or a secret in a URL (``?access_token=...``) although Aegis never
    reads credentials from there; the access log must not keep what it was sent. uvicorn logs
    ``(client, method, path with query, http version, status)`` as the record's arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
        return True


def hide_access_log_queries() -> None:
    """Add :class:`QueryStringFilter` to uvicorn's access log, once (call it after uvicorn has
    configured its loggers, i.e. after building a ``uvicorn.Config``)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryStringFilter) for f in access.filters):
        access.addFilter(QueryStringFilter())


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"aegis_fields": fields})
