"""Telemetry vocabulary (OpenTelemetry semantic attributes for Aegis): every span name and attribute
key the gateway writes, as constants, so dashboards, tests and docs read one list.

The attributes describe one decision (ARCHITECTURE.md, pipeline step 10). Values are never tokens,
proofs or secrets: identifiers, codes, booleans and content-addressed versions only.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AGENT_ID",
    "DECISION",
    "DECISION_ID",
    "DECISION_REASON",
    "JTI_SEEN",
    "PARENT_CHAIN_VALIDATED",
    "POLICY_VERSION",
    "SPAN_GATEWAY_DECIDE",
    "TENANT",
    "TOOL",
    "VERIFICATION_RESULT",
]

#: The span around one pass of the decision pipeline.
SPAN_GATEWAY_DECIDE: Final = "aegis.gateway.decide"

#: bool: the access token (signature, claims) and its binding verified.
VERIFICATION_RESULT: Final = "aegis.verification_result"
#: bool: the delegation chain was verified (true also for an undelegated token).
PARENT_CHAIN_VALIDATED: Final = "aegis.parent_chain_validated"
#: bool: the call's single-use proof had been seen before (a replay); false once it was recorded
#: fresh; absent when the call never reached the replay step.
JTI_SEEN: Final = "aegis.jti_seen"
#: str: the stable error code or the policy reason that decided.
DECISION_REASON: Final = "aegis.decision_reason"
#: str: the content-addressed policy version (or ``allowlist``) that decided.
POLICY_VERSION: Final = "aegis.policy_version"
#: str: the verified agent id (absent when the token did not verify).
AGENT_ID: Final = "aegis.agent_id"
#: str: allow | deny | sanitize | approval_needed.
DECISION: Final = "aegis.decision"
#: str: the decision id, also in the ``x-aegis-decision-id`` header and the audit record.
DECISION_ID: Final = "aegis.decision_id"
TOOL: Final = "aegis.tool"
TENANT: Final = "aegis.tenant"
