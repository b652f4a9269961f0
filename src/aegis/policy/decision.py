"""Policy decisions and the one combining algorithm: deny > approval_needed > sanitize > allow.

Combining is order-independent and default-deny, and it is written twice on purpose: here for the
in-process evaluator and as the ``decide`` function of the generated Rego (``aegis.policy.rego``).
The differential tests hold the two to the same answer. The rules, for a set of rule errors and a
set of matched rules:

1. any rule error (a type mismatch at run time) -> ``deny`` with code ``policy_error``; the rule
   ids and reasons are those of the failing rules plus any matched deny rules;
2. else any matched deny -> ``deny`` (``access_denied``);
3. else any approval_needed -> ``approval_needed``, with the approvals, and the obligations of
   matched sanitize rules (applied once the call is approved);
4. else any sanitize -> ``sanitize`` with the union of their obligations;
5. else any allow -> ``allow``;
6. else ``deny``: no rule matched, default deny.

``rule_ids`` and ``reasons`` are those of the rules that decided, sorted and without duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

__all__ = [
    "ACTIONS",
    "DEFAULT_DENY_REASON",
    "SHADOW_POLICY_REASON",
    "ApprovalRequirement",
    "Decision",
    "Outcome",
    "RuleOutcome",
    "SanitizeObligation",
    "combine",
]

Action = Literal["allow", "deny", "sanitize", "approval_needed"]
#: Strongest first.
ACTIONS: Final[tuple[Action, ...]] = ("deny", "approval_needed", "sanitize", "allow")
DEFAULT_DENY_REASON: Final = "no rule matched; default deny"
SHADOW_POLICY_REASON: Final = "policy in shadow mode; would-be decision recorded"


@dataclass(frozen=True, slots=True, order=True)
class SanitizeObligation:
    """One step the gateway applies before forwarding (request) or answering (response)."""

    kind: str  # redact | mask | drop_header
    target: str  # request | response
    path: str | None = None
    pattern: str | None = None
    header: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True, order=True)
class ApprovalRequirement:
    group: str
    channel: str
    expires_in: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """What the combiner needs to know about one matched rule."""

    id: str
    action: Action
    reason: str
    obligations: tuple[SanitizeObligation, ...] = ()
    approval: ApprovalRequirement | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A combined result before it is stamped with a version (also the shadow summary)."""

    action: Action
    reasons: tuple[str, ...]
    rule_ids: tuple[str, ...]
    code: str | None
    obligations: tuple[SanitizeObligation, ...] = ()
    approvals: tuple[ApprovalRequirement, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reasons": list(self.reasons),
            "rule_ids": list(self.rule_ids),
            "code": self.code,
            "obligations": [o.to_dict() for o in self.obligations],
            "approvals": [a.to_dict() for a in self.approvals],
        }


def combine(errors: Iterable[tuple[str, str]], hits: Iterable[RuleOutcome]) -> Outcome:
    """Combine rule errors ``(rule_id, message)`` and matched rules into one outcome."""
    errs = set(errors)
    by_action: dict[str, list[RuleOutcome]] = {a: [] for a in ACTIONS}
    for hit in hits:
        by_action[hit.action].append(hit)
    denies = by_action["deny"]
    if errs:
        return Outcome(
            action="deny",
            reasons=tuple(sorted({m for _, m in errs} | {h.reason for h in denies})),
            rule_ids=tuple(sorted({i for i, _ in errs} | {h.id for h in denies})),
            code="policy_error",
        )
    for action in ACTIONS:
        deciding = by_action[action]
        if not deciding:
            continue
        obligations: tuple[SanitizeObligation, ...] = ()
        if action in ("sanitize", "approval_needed"):
            obligations = tuple(sorted({o for h in by_action["sanitize"] for o in h.obligations}))
        approvals = tuple(sorted({h.approval for h in deciding if h.approval is not None}))
        return Outcome(
            action=action,
            reasons=tuple(sorted({h.reason for h in deciding})),
            rule_ids=tuple(sorted({h.id for h in deciding})),
            code=_CODES[action],
            obligations=obligations,
            approvals=approvals,
        )
    return Outcome("deny", (DEFAULT_DENY_REASON,), (), "access_denied")


_CODES: Final[dict[str, str | None]] = {
    "deny": "access_denied",
    "approval_needed": "approval_needed",
    "sanitize": None,
    "allow": None,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one call. ``shadow`` is the would-be outcome when shadow rules (or a policy
    in shadow mode) are present; it never changes ``action``."""

    action: Action
    reasons: tuple[str, ...]
    rule_ids: tuple[str, ...]
    policy_version: str
    code: str | None = None
    obligations: tuple[SanitizeObligation, ...] = ()
    approvals: tuple[ApprovalRequirement, ...] = ()
    shadow: Outcome | None = None

    @property
    def allowed(self) -> bool:
        """True only for ``allow`` and ``sanitize`` (with obligations applied)."""
        return self.action in ("allow", "sanitize")

    @classmethod
    def from_outcome(
        cls, outcome: Outcome, policy_version: str, shadow: Outcome | None = None
    ) -> Decision:
        return cls(
            action=outcome.action,
            reasons=outcome.reasons,
            rule_ids=outcome.rule_ids,
            policy_version=policy_version,
            code=outcome.code,
            obligations=outcome.obligations,
            approvals=outcome.approvals,
            shadow=shadow,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by the audit log, dry runs and ``aegis policy eval``."""
        out = {
            "action": self.action,
            "reasons": list(self.reasons),
            "rule_ids": list(self.rule_ids),
            "policy_version": self.policy_version,
            "code": self.code,
            "obligations": [o.to_dict() for o in self.obligations],
            "approvals": [a.to_dict() for a in self.approvals],
            "shadow": self.shadow.to_dict() if self.shadow is not None else None,
        }
        return out
