"""Human approvals (docs/approvals.md): requests for calls that policy holds, notifications where
approvers work, authenticated decisions, and one-time override tokens bound to the approved call.

Layering: this package sits beside the audit log and the policy engine; it never imports the
gateway, the server or the CLI. :func:`build_approval_service` wires it from the configuration.
"""

from __future__ import annotations

from aegis.approvals.directory import ApproverDirectory, Via
from aegis.approvals.model import (
    ApprovalRequest,
    HeldCall,
    State,
    call_digest,
    redact_parameters,
)
from aegis.approvals.override import OVERRIDE_HEADER, OVERRIDE_TYP, Override, OverrideTokens
from aegis.approvals.service import ApprovalService
from aegis.approvals.store import SqlApprovalStore
from aegis.approvals.wiring import approvals_for, build_approval_service

__all__ = [
    "OVERRIDE_HEADER",
    "OVERRIDE_TYP",
    "ApprovalRequest",
    "ApprovalService",
    "ApproverDirectory",
    "HeldCall",
    "Override",
    "OverrideTokens",
    "SqlApprovalStore",
    "State",
    "Via",
    "approvals_for",
    "build_approval_service",
    "call_digest",
    "redact_parameters",
]
