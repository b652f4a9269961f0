"""A call decided under each reading of its path some upstream may serve it as.

Rails serves ``/payments/refund.json`` and Express ``/payments/refund/`` as ``/payments/refund``,
PHP ``/admin.php/x`` as ``/admin.php``. A rule on ``path_loose`` must hold for every such reading
(docs/policy.md, ``path_loose``): :func:`decide_readings` combines the decisions of the readings as
rules combine. The gateway applies it to every call whose policy reads ``path_loose``, and a dry
run to every call, so that both answer alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, TypeVar

from aegis.policy.decision import Decision, Outcome
from aegis.policy.evaluator import CompiledPolicy
from aegis.policy.input import path_variants

__all__ = ["decide_readings"]


def decide_readings(policy: CompiledPolicy, doc: dict[str, Any], decision: Decision) -> Decision:
    """``decision`` combined with the decisions of the path's other readings, as some upstreams
    read it: the variant readings (:func:`~aegis.policy.input.path_variants`: without a
    trailing ``/``, cut at a dot of the last segment, cut after a script; Rails serves
    ``/payments/refund.json`` and Express ``/payments/refund/`` as ``/payments/refund``, PHP
    ``/admin.php/x`` as ``/admin.php``), and each reading without a trailing ``/`` read with one
    (Express serves ``/admin`` as ``/admin/``, Rails ``/admin.json`` as ``/admin/`` too).

    A rule on ``path_loose`` must hold for every reading, so the readings combine as rules do
    (:mod:`aegis.policy.decision`): a deny under any denies (on a variant, the default deny
    too: nothing allows the path some upstream serves); otherwise the strictest action wins,
    with every approval and every obligation any reading carries. A slashed reading counts only
    where a rule matched it and restricts the call (approval_needed, sanitize): an allow-list
    naming ``/admin`` still allows it, a deny rule ``regex: ^/admin/`` denies ``/admin`` and
    ``/admin.json`` too, and an approval rule on ``^/payments/`` holds ``/payments``. A
    reading's shadow outcome that denies is kept, so that a policy tried in shadow mode reports
    what it would refuse."""
    loose = doc.get("path_loose")
    if not isinstance(loose, str) or decision.action == "deny":
        return decision
    variants = path_variants(loose)
    slashed = [f"{r}/" for r in (loose, *variants) if not r.endswith("/")]
    combined, shadow = decision, decision.shadow
    for reading in dict.fromkeys([*variants, *slashed]):
        if reading == loose:
            continue
        other = policy.evaluate({**doc, "path_loose": reading})
        would = other.shadow
        if shadow is not None and would is not None and (reading in variants or would.rule_ids):
            shadow = _combined(shadow, would, reading)  # what shadow mode reports, alike
        if not (reading in variants or other.rule_ids) or other.action == "allow":
            continue
        if other.action == "deny":
            return _as_variant(other, reading)
        combined = _combined(combined, other, reading)
    if combined is decision and shadow is decision.shadow:
        return decision
    return dataclasses.replace(combined, shadow=shadow)


#: How much an outcome restricts a call (the combining order of ``aegis.policy.decision``).
_STRICTNESS: Final = {"allow": 0, "sanitize": 1, "approval_needed": 2, "deny": 3}

_Result = TypeVar("_Result", Decision, Outcome)


def _combined(base: _Result, other: Decision | Outcome, reading: str) -> _Result:
    """``base`` and a reading's ``other`` as one, as :mod:`aegis.policy.decision` combines
    rules: a deny wins; else the stricter action with its code, and every approval and
    obligation of both. The rules and reasons are those that decided: the stricter side's, and
    the other's only where it adds an approval or obligation."""
    if other.action == "allow":
        return base
    if other.action == "deny":
        return base if base.action == "deny" else dataclasses.replace(
            base, action="deny", code=other.code, obligations=(), approvals=(),
            rule_ids=other.rule_ids, reasons=other.reasons,
        )  # fmt: skip
    if base.action == "deny":
        return base
    adds = not (
        set(other.obligations) <= set(base.obligations)
        and set(other.approvals) <= set(base.approvals)
    )
    if _STRICTNESS[other.action] <= _STRICTNESS[base.action] and not adds:
        return base  # nothing the reading adds
    stricter = _STRICTNESS[other.action] > _STRICTNESS[base.action]
    lead: Decision | Outcome = other if stricter else base
    rest: Decision | Outcome = base if stricter else other
    rest_adds: bool = _STRICTNESS[other.action] == _STRICTNESS[base.action] or not (
        set(rest.obligations) <= set(lead.obligations)
        and set(rest.approvals) <= set(lead.approvals)
    )
    why = f"decided as the path {reading[:128]!r} too, which some upstreams serve the call as"
    rules: list[str] = [*lead.rule_ids, *(rest.rule_ids if rest_adds else ())]
    reasons: list[str] = [*lead.reasons, *(rest.reasons if rest_adds else ()), why]
    return dataclasses.replace(
        base,
        action=lead.action,
        code=lead.code,
        obligations=tuple(sorted(set(base.obligations) | set(other.obligations))),
        approvals=tuple(sorted(set(base.approvals) | set(other.approvals))),
        rule_ids=tuple(sorted(set(rules))),
        reasons=tuple(dict.fromkeys(reasons)),
    )


def _as_variant(denied: Decision, variant: str) -> Decision:
    """``denied`` (a variant reading's outcome) with a reason naming the reading, and, where no
    rule matched it, what would allow the call."""
    why = f"decided as the path {variant[:128]!r}, which some upstreams serve the call as"
    if not denied.rule_ids and denied.action == "deny":
        why += "; no rule allows that path: allow it too, or match both paths with one regex"
    return dataclasses.replace(denied, reasons=(*denied.reasons, why))
