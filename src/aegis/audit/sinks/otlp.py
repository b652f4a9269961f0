"""OTLP/HTTP logs sink (OTLP specification 1.x, ``ExportLogsServiceRequest`` in the JSON encoding).

OTLP/HTTP carries the request either as binary protobuf or as the "JSON Protobuf Encoding" (proto3
JSON mapping with lowerCamelCase field names, 64-bit integers as decimal strings, enums as numbers);
every OTLP receiver accepts both. Aegis sends JSON: the binary form would need the
``opentelemetry-proto`` package, whose modules collide with the copies that Envoy's ``xds-protos``
ships under the same names, so which one a fresh install ends up with depends on install order.

Each record becomes one ``LogRecord``: ``timeUnixNano`` from the record's append time, severity
INFO, the canonical JSON as the string body, and attributes ``aegis.audit.seq``,
``aegis.audit.kind`` and ``aegis.audit.hash``. Per the OTLP/HTTP spec, 429, 502, 503 and 504 (and
connection errors) are retryable: :class:`SinkDown`; any other non-2xx is :class:`SinkRejected`.
"""

from __future__ import annotations

import json
from typing import Any, Final

import httpx

from aegis.audit.ship import ShippedRecord, SinkDown, SinkPartlyRejected, SinkRejected

__all__ = ["OtlpSink", "encode_request"]

_RETRYABLE: Final = frozenset({429, 502, 503, 504})
#: ``SeverityNumber.SEVERITY_NUMBER_INFO`` in opentelemetry/proto/logs/v1/logs.proto.
_SEVERITY_INFO: Final = 9


def _kv(key: str, value: str | int) -> dict[str, Any]:
    # proto3 JSON mapping: int64 values are decimal strings.
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def encode_request(records: list[ShippedRecord], *, service: str = "aegis") -> bytes:
    """An ``ExportLogsServiceRequest`` as OTLP JSON (UTF-8 bytes)."""
    logs = [
        {
            "timeUnixNano": str(int(r.time * 1e9)),
            "observedTimeUnixNano": str(int(r.time * 1e9)),
            "severityNumber": _SEVERITY_INFO,
            "severityText": "INFO",
            "body": {"stringValue": r.record},
            "attributes": [
                _kv("aegis.audit.seq", r.seq),
                _kv("aegis.audit.kind", r.kind),
                _kv("aegis.audit.hash", r.hash),
            ],
        }
        for r in records
    ]
    request = {
        "resourceLogs": [
            {
                "resource": {"attributes": [_kv("service.name", service)]},
                "scopeLogs": [{"scope": {"name": "aegis.audit"}, "logRecords": logs}],
            }
        ]
    }
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class OtlpSink:
    def __init__(
        self,
        endpoint: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        name: str = "otlp",
    ) -> None:
        self.name, self._endpoint = name, endpoint
        self._client = httpx.Client(
            timeout=timeout,
            headers={**(headers or {}), "content-type": "application/json"},
        )

    def delivered(self) -> int:
        return 0

    def send(self, records: list[ShippedRecord]) -> None:
        try:
            response = self._client.post(self._endpoint, content=encode_request(records))
        except httpx.HTTPError as exc:
            raise SinkDown(f"OTLP endpoint unreachable: {type(exc).__name__}") from exc
        if 200 <= response.status_code < 300:
            return _partial_success(response.content, len(records))
        if response.status_code in _RETRYABLE or response.status_code >= 500:
            raise SinkDown(f"OTLP endpoint answered {response.status_code}")
        raise SinkRejected(f"OTLP endpoint refused the batch with {response.status_code}")

    def close(self) -> None:
        self._client.close()


def _partial_success(body: bytes, sent: int) -> None:
    """A 2xx that says some records were refused (``partialSuccess.rejectedLogRecords``, OTLP
    §"Partial Success") is a refusal: the spec says not to retry them, and which ones it does
    not say, so the batch is dead-lettered whole, never sent again (the accepted ones would
    reach the collector twice; they are in both the collector and the dead-letter file)."""
    if not body:
        return
    try:
        partial = json.loads(body).get("partialSuccess") or {}
        rejected = int(partial.get("rejectedLogRecords") or 0)
    except (ValueError, AttributeError, TypeError):
        return  # not the JSON encoding's answer: a 2xx is a delivery
    if rejected > 0:
        why = str(partial.get("errorMessage") or "")[:200]
        raise SinkPartlyRejected(
            f"OTLP endpoint rejected {rejected} of {sent} records of the batch"
            + (f": {why}" if why else "")
        )
