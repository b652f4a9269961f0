"""OTLP/HTTP logs sink (OTLP specification 1.x, ``ExportLogsServiceRequest`` as protobuf).

Each record becomes one ``LogRecord``: ``time_unix_nano`` from the record's append time, severity
INFO, the canonical JSON as the string body, and attributes ``aegis.audit.seq``,
``aegis.audit.kind`` and ``aegis.audit.hash``. Per the OTLP/HTTP spec, 429, 502, 503 and 504 (and
connection errors) are retryable: :class:`SinkDown`; any other non-2xx is :class:`SinkRejected`.
"""

from __future__ import annotations

from typing import Final

import httpx
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from aegis.audit.ship import ShippedRecord, SinkDown, SinkRejected

__all__ = ["OtlpSink", "encode_request"]

_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_SEVERITY_INFO: Final = 9


def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def encode_request(records: list[ShippedRecord], *, service: str = "aegis") -> bytes:
    logs = [
        LogRecord(
            time_unix_nano=int(r.time * 1e9),
            observed_time_unix_nano=int(r.time * 1e9),
            severity_number=_SEVERITY_INFO,  # type: ignore[arg-type]
            severity_text="INFO",
            body=AnyValue(string_value=r.record),
            attributes=[
                _kv("aegis.audit.seq", r.seq),
                _kv("aegis.audit.kind", r.kind),
                _kv("aegis.audit.hash", r.hash),
            ],
        )
        for r in records
    ]
    request = ExportLogsServiceRequest(
        resource_logs=[
            ResourceLogs(
                resource=Resource(attributes=[_kv("service.name", service)]),
                scope_logs=[
                    ScopeLogs(scope=InstrumentationScope(name="aegis.audit"), log_records=logs)
                ],
            )
        ]
    )
    data: bytes = request.SerializeToString()
    return data


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
            headers={**(headers or {}), "content-type": "application/x-protobuf"},
        )

    def delivered(self) -> int:
        return 0

    def send(self, records: list[ShippedRecord]) -> None:
        try:
            response = self._client.post(self._endpoint, content=encode_request(records))
        except httpx.HTTPError as exc:
            raise SinkDown(f"OTLP endpoint unreachable: {type(exc).__name__}") from exc
        if 200 <= response.status_code < 300:
            return
        if response.status_code in _RETRYABLE or response.status_code >= 500:
            raise SinkDown(f"OTLP endpoint answered {response.status_code}")
        raise SinkRejected(f"OTLP endpoint refused the batch with {response.status_code}")

    def close(self) -> None:
        self._client.close()
