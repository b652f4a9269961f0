"""Prometheus metrics: every name and label is a constant here, and nowhere else.

Metrics live in one registry per process (:data:`REGISTRY`) served at ``/metrics``. Rejections are
counted by their stable error code, so a dashboard reads the same vocabulary as the API.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aegis.telemetry.steps import StepHistogram

__all__ = [
    "ADMIN_REQUESTS",
    "APPROVALS_PENDING",
    "APPROVAL_DECISIONS",
    "APPROVAL_DECISION_SECONDS",
    "APPROVAL_NEEDED",
    "APPROVAL_NOTIFICATIONS",
    "APPROVAL_REJECTIONS",
    "APPROVAL_REQUESTS",
    "AUDIT_BATCH_RECORDS",
    "AUDIT_CHECKPOINT_SIZE",
    "AUDIT_EXPORTED",
    "AUDIT_SINK_DOWN",
    "CERTS_ISSUED",
    "DECISIONS",
    "EXPIRED_TOKEN_REJECTIONS",
    "FAILED_SIGNATURE_VERIFICATIONS",
    "FORWARD_FAILURES",
    "MTLS_REJECTIONS",
    "OAUTH_REJECTIONS",
    "PIPELINE_STEPS",
    "PIPELINE_STEP_SECONDS",
    "REGISTRY",
    "REPLAY_ATTEMPTS",
    "TOKENS_ISSUED",
    "TOKEN_ENDPOINT_SECONDS",
    "count_decision",
    "count_forward_failure",
    "count_rejection",
]

REGISTRY: Final = CollectorRegistry(auto_describe=True)

TOKENS_ISSUED: Final = Counter(
    "aegis_tokens_issued_total",
    "Access tokens issued by the token endpoint.",
    ["grant_type", "auth_method"],
    registry=REGISTRY,
)
OAUTH_REJECTIONS: Final = Counter(
    "aegis_oauth_rejections_total",
    "Requests refused by the OAuth endpoints, by endpoint and stable error code.",
    ["endpoint", "code"],
    registry=REGISTRY,
)
ADMIN_REQUESTS: Final = Counter(
    "aegis_admin_requests_total",
    "Admin API requests by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
TOKEN_ENDPOINT_SECONDS: Final = Histogram(
    "aegis_token_endpoint_seconds",
    "Time spent serving token endpoint requests.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)


MTLS_REJECTIONS: Final = Counter(
    "aegis_mtls_rejections_total",
    "Peer certificates refused before any policy ran, by front door and stable error code.",
    ["listener", "code"],
    registry=REGISTRY,
)
CERTS_ISSUED: Final = Counter(
    "aegis_certificates_issued_total",
    "Agent certificates issued by the internal CA, by how the caller authenticated.",
    ["auth"],
    registry=REGISTRY,
)

# -- gateway decision pipeline (docs/gateway.md) ----------------------------------------------
FAILED_SIGNATURE_VERIFICATIONS: Final = Counter(
    "aegis_failed_signature_verifications_total",
    "Access tokens or proofs whose signature did not verify at the gateway.",
    registry=REGISTRY,
)
REPLAY_ATTEMPTS: Final = Counter(
    "aegis_replay_attempts_total",
    "Single-use proofs (DPoP jti, single-use token jti) presented a second time, at the "
    "gateway or the token endpoint.",
    registry=REGISTRY,
)
EXPIRED_TOKEN_REJECTIONS: Final = Counter(
    "aegis_expired_token_rejections_total",
    "Calls refused because the access token had expired.",
    registry=REGISTRY,
)
APPROVAL_NEEDED: Final = Counter(
    "aegis_approval_needed_total",
    "Calls held because policy requires a human approval.",
    registry=REGISTRY,
)
# -- human approvals (docs/approvals.md) -------------------------------------------------------
APPROVAL_REQUESTS: Final = Counter(
    "aegis_approval_requests_total",
    "Approval requests opened, by the policy rule that asked for them.",
    ["rule"],
    registry=REGISTRY,
)
APPROVAL_DECISIONS: Final = Counter(
    "aegis_approval_decisions_total",
    "Approval requests closed, by rule and outcome (approved, denied, expired, used).",
    ["rule", "outcome"],
    registry=REGISTRY,
)
APPROVALS_PENDING: Final = Gauge(
    "aegis_approvals_pending",
    "Approval requests waiting for a decision (as last seen by this process).",
    registry=REGISTRY,
)
APPROVAL_DECISION_SECONDS: Final = Histogram(
    "aegis_approval_decision_seconds",
    "Time from an approval request to its decision, by outcome.",
    ["outcome"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400),
    registry=REGISTRY,
)
APPROVAL_NOTIFICATIONS: Final = Counter(
    "aegis_approval_notifications_total",
    "Approval notifications by channel kind and outcome (delivered, retried, failed).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
APPROVAL_REJECTIONS: Final = Counter(
    "aegis_approval_rejections_total",
    "Refused approval decisions, callbacks and override tokens, by stable error code.",
    ["code"],
    registry=REGISTRY,
)
# -- audit log (docs/audit.md) ----------------------------------------------------------------
AUDIT_BATCH_RECORDS: Final = Histogram(
    "aegis_audit_batch_records",
    "Records appended to the audit log per commit (group commit: calls decided together share one).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
AUDIT_CHECKPOINT_SIZE: Final = Gauge(
    "aegis_audit_checkpoint_tree_size",
    "Records covered by the newest signed audit checkpoint this process made or saw.",
    registry=REGISTRY,
)
AUDIT_EXPORTED: Final = Counter(
    "aegis_audit_exported_total",
    "Audit records handed to an export sink, by sink and outcome (sent, dead_lettered).",
    ["sink", "outcome"],
    registry=REGISTRY,
)
AUDIT_SINK_DOWN: Final = Counter(
    "aegis_audit_sink_down_total",
    "Failed attempts to deliver a batch to an export sink that is down (each is retried).",
    ["sink"],
    registry=REGISTRY,
)
DECISIONS: Final = Counter(
    "aegis_decisions",
    "Gateway decisions by action and reason (the stable error code, or ok).",
    ["action", "reason"],
    registry=REGISTRY,
)
#: The gateway decision pipeline's steps, in order (``aegis.gateway.pipeline``).
PIPELINE_STEPS: Final = (
    "token",
    "binding",
    "replay",
    "subject",
    "delegation",
    "policy",
    "limits",
    "evidence",
)
#: Recorded once per call for all its steps (``aegis.telemetry.steps``).
PIPELINE_STEP_SECONDS: Final = StepHistogram(
    "aegis_pipeline_step_seconds",
    "Time spent in each step of the gateway decision pipeline.",
    PIPELINE_STEPS,
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0),
    registry=REGISTRY,
)


_DECISION_COUNTERS: dict[tuple[str, str], Any] = {}


def count_decision(action: str, code: str | None) -> None:
    """One gateway decision in ``aegis_decisions_total`` (reason: the stable code, or ``ok``).
    The labelled child is looked up once per (action, reason): the codes are a fixed set."""
    key = (action, code or "ok")
    child = _DECISION_COUNTERS.get(key)
    if child is None:
        child = _DECISION_COUNTERS[key] = DECISIONS.labels(action=key[0], reason=key[1])
    child.inc()


FORWARD_FAILURES: Final = Counter(
    "aegis_gateway_forward_failures",
    "Allowed calls the reverse proxy did not deliver whole, by tool and code (upstream_timeout,"
    " bad_gateway, payload_too_large, server_error).",
    ["tool", "code"],
    registry=REGISTRY,
)


def count_forward_failure(tool: str, code: str) -> None:
    FORWARD_FAILURES.labels(tool=tool, code=code).inc()


def count_rejection(endpoint: str, code: str) -> None:
    OAUTH_REJECTIONS.labels(endpoint=endpoint, code=code).inc()
