"""Whole-document checks of a policy: duplicate rule ids and rules that can never match.

Field-level checks live on the model; these need several fields at once. Each finding is a
``(loc, message)`` pair whose ``loc`` is a JSON path into the source document, so the loader can
report it as ``file:line``. The contradiction analysis is deliberately simple and sound: it only
looks at conditions joined by ``all`` (and the ``match`` block), and only reports what is certainly
contradictory (numeric ranges that do not overlap, two different ``eq`` values, an ``eq`` outside an
``in`` list or inside a ``not_in`` list, ``exists: false`` next to a test of the same path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aegis.policy.model import Condition, PolicyDocument, Rule
from aegis.policy.values import json_equal

__all__ = ["Finding", "check_document"]

Loc = tuple[str | int, ...]
Finding = tuple[Loc, str]


@dataclass
class _PathFacts:
    low: tuple[float, bool, Loc] | None = None  # (bound, inclusive, where)
    high: tuple[float, bool, Loc] | None = None
    eqs: list[tuple[Any, Loc]] = field(default_factory=list)
    ins: list[tuple[list[Any], Loc]] = field(default_factory=list)
    not_ins: list[tuple[list[Any], Loc]] = field(default_factory=list)
    absent: Loc | None = None
    present: Loc | None = None


def _conjuncts(cond: Condition, loc: Loc) -> list[tuple[Condition, Loc]]:
    if cond.operator == "all":
        out: list[tuple[Condition, Loc]] = []
        for i, child in enumerate(cond.all_ or ()):
            out.extend(_conjuncts(child, (*loc, "all", i)))
        return out
    return [(cond, loc)]


def _tighter(
    old: tuple[float, bool, Loc] | None, new: tuple[float, bool, Loc], lower: bool
) -> tuple[float, bool, Loc]:
    if old is None:
        return new
    if new[0] == old[0]:
        return new if not new[1] else old
    return new if (new[0] > old[0]) == lower else old


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _contradiction(f: _PathFacts) -> tuple[Loc, str] | None:
    if f.absent is not None and f.present is not None:
        return f.present, "this test needs a value that 'exists: false' requires to be absent"
    if f.low and f.high:
        (lo, lo_inc, lo_at), (hi, hi_inc, hi_at) = f.low, f.high
        where = max(lo_at, hi_at)  # report the later of the two, where the conflict appears
        if lo > hi or (lo == hi and not (lo_inc and hi_inc)):
            return where, f"numeric range is empty (above {lo} and below {hi})"
    for i, (value, where) in enumerate(f.eqs):
        for other, _ in f.eqs[:i]:
            if not json_equal(value, other):
                return where, "two different 'eq' values on the same path"
        if _is_number(value):
            if f.low and (value < f.low[0] or (value == f.low[0] and not f.low[1])):
                return where, f"'eq {value}' is outside the numeric range"
            if f.high and (value > f.high[0] or (value == f.high[0] and not f.high[1])):
                return where, f"'eq {value}' is outside the numeric range"
        for options, _ in f.ins:
            if not any(json_equal(value, o) for o in options):
                return where, "'eq' value is not in the 'in' list on the same path"
        for options, _ in f.not_ins:
            if any(json_equal(value, o) for o in options):
                return where, "'eq' value is excluded by 'not_in' on the same path"
    return None


def _check_rule(rule: Rule, loc: Loc) -> list[Finding]:
    if rule.when is None:
        return []
    facts: dict[str, _PathFacts] = {}
    for cond, where in _conjuncts(rule.when, (*loc, "when")):
        if cond.path is None:
            continue
        f = facts.setdefault(cond.path, _PathFacts())
        op, value = cond.operator, cond.operand
        if op == "exists" and value is False:
            f.absent = where
            continue
        f.present = f.present or where
        if op in ("gt", "gte"):
            f.low = _tighter(f.low, (value, op == "gte", where), lower=True)
        elif op in ("lt", "lte"):
            f.high = _tighter(f.high, (value, op == "lte", where), lower=False)
        elif op == "eq":
            f.eqs.append((value, where))
        elif op == "in":
            f.ins.append((value, where))
        elif op == "not_in":
            f.not_ins.append((value, where))
    out: list[Finding] = []
    for path, f in sorted(facts.items()):
        found = _contradiction(f)
        if found is not None:
            out.append((found[0], f"rule {rule.id!r} can never match: {path}: {found[1]}"))
    return out


def check_document(doc: PolicyDocument) -> list[Finding]:
    """Every whole-document problem, in source order."""
    findings: list[Finding] = []
    seen: dict[str, int] = {}
    for i, rule in enumerate(doc.spec.rules):
        loc: Loc = ("spec", "rules", i)
        if rule.id in seen:
            findings.append(
                (
                    (*loc, "id"),
                    f"duplicate rule id {rule.id!r} (first used by rule #{seen[rule.id]})",
                )
            )
        seen.setdefault(rule.id, i)
        findings.extend(_check_rule(rule, loc))
    return findings
