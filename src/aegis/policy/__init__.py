"""Aegis policy: ``aegis/v1`` documents compiled to an in-process evaluator and an OPA bundle.

Layers, lowest first: ``yamlsource`` / ``safe_regex`` / ``model`` / ``checks`` / ``loader`` (load
and validate), ``ir`` (lower), ``predicates`` / ``evaluator`` (the hot path), ``rego`` (the OPA
bundle), ``decision`` (one combining algorithm), ``input`` (the one input document),
``obligations`` (sanitization), ``version`` / ``store`` / ``service`` / ``watcher`` (versions and hot
reload), ``shadow``, ``dryrun`` and ``testing`` (tools for policy authors).
"""

from __future__ import annotations

from aegis.policy.decision import (
    ApprovalRequirement,
    Decision,
    Outcome,
    SanitizeObligation,
)
from aegis.policy.dryrun import dry_run
from aegis.policy.evaluator import CompiledPolicy, compile_policy
from aegis.policy.input import AgentInfo, ChainInfo, PolicyCall, build_input, call_from_dict
from aegis.policy.loader import load_document, load_file
from aegis.policy.model import PolicyDocument
from aegis.policy.obligations import apply_to_body, apply_to_headers
from aegis.policy.rego import build_bundle, to_rego
from aegis.policy.service import PolicyService
from aegis.policy.shadow import SHADOW_WOULD_DENY_TOTAL, record_shadow, shadow_report
from aegis.policy.store import MemoryPolicyStore, PolicyStore, SqlPolicyStore
from aegis.policy.version import policy_version
from aegis.policy.watcher import PolicyWatcher

__all__ = [
    "SHADOW_WOULD_DENY_TOTAL",
    "AgentInfo",
    "ApprovalRequirement",
    "ChainInfo",
    "CompiledPolicy",
    "Decision",
    "MemoryPolicyStore",
    "Outcome",
    "PolicyCall",
    "PolicyDocument",
    "PolicyService",
    "PolicyStore",
    "PolicyWatcher",
    "SanitizeObligation",
    "SqlPolicyStore",
    "apply_to_body",
    "apply_to_headers",
    "build_bundle",
    "build_input",
    "call_from_dict",
    "compile_policy",
    "dry_run",
    "load_document",
    "load_file",
    "policy_version",
    "record_shadow",
    "shadow_report",
    "to_rego",
]
