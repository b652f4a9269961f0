"""The intermediate form both engines compile from: rules lowered to leaves and boolean nodes.

A validated :class:`~aegis.policy.model.PolicyDocument` is lowered once. The ``match`` block is
sugar: each selector becomes a leaf with an internal operator (``glob``, ``intersects``, ``in``,
``contains``, ``gte``/``lte``) so that the Python evaluator and the Rego generator share one
meaning for every selector. Leaves carry their human label and, for operators that can fail at run
time, the exact error message both engines report.

Run-time type rules (documented in ``docs/policy.md``):

* a missing path makes every leaf false except ``exists: false``;
* ``eq ne in not_in`` compare JSON values strictly (numbers by value; ``true`` is not ``1``, ``"42"``
  is not ``42``). In a condition, a present string, number or boolean whose JSON type is not the
  type of the literal (for ``in``/``not_in``: of any scalar in the list) is a *rule error*:
  upstream servers convert these types into one another (Jackson binds ``"42"`` to an ``int``
  field, ``1`` and ``"true"`` to a ``boolean``), so a strict non-match there would be a wrong
  allow. When every number the literal holds is whole, a present number with a fraction is a rule
  error too: servers drop the fraction when they bind it to an integer (Jackson reads ``42.5`` as
  ``42``, as do Rails ``to_i`` and PHP ``(int)``). ``null``, lists and objects, as values or
  literals, never error; selectors never error;
* ``lt lte gt gte`` need a number, ``regex`` a string of at most
  :data:`~aegis.policy.safe_regex.MAX_SUBJECT_LENGTH` characters, ``contains`` a string or a list,
  a time window a valid ``time.unix``. Any other present value is a *rule error*: the rule cannot
  match and the decision is ``deny`` with code ``policy_error``, never an allow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from aegis.errors import PolicyError
from aegis.policy.decision import ApprovalRequirement, RuleOutcome, SanitizeObligation
from aegis.policy.model import Condition, PolicyDocument, Rule, TimeWindow
from aegis.policy.safe_regex import MAX_SUBJECT_LENGTH, SafeRegex, compile_safe, glob_to_regex
from aegis.policy.values import scalar_types, whole_numbers

__all__ = [
    "COMPARING_OPERATORS",
    "FAILING_OPERATORS",
    "MAX_UNIX",
    "Leaf",
    "LoweredPolicy",
    "LoweredRule",
    "Node",
    "lower",
]

#: A time window decides ``time.unix`` before this (2100-01-01T00:00:00Z), and a later time is a
#: rule error. The engines' time zone data agree up to there and not beyond: past 2099 the Rust
#: Rego engine's zones stop changing to summer time, while Python's (and Go's) go on applying the
#: zone's rule, so a window in Europe/London would decide the same call two ways.
MAX_UNIX: Final = 4_102_444_800
#: Operators that raise a rule error on a present value of the wrong type (in conditions).
FAILING_OPERATORS: Final = frozenset(
    {"eq", "ne", "in", "not_in", "contains", "lt", "lte", "gt", "gte", "regex", "time"}
)
#: Operators that compare with literals of any JSON type and fail on a scalar of another type.
COMPARING_OPERATORS: Final = frozenset({"eq", "ne", "in", "not_in"})
_SCALAR_ORDER: Final = ("string", "number", "boolean")
_STRING_ROOTS: Final = (("request", "query"), ("request", "headers"))
_NEEDS: Final = {
    "contains": "a string or a list",
    "lt": "a number",
    "lte": "a number",
    "gt": "a number",
    "gte": "a number",
    "regex": f"a string of at most {MAX_SUBJECT_LENGTH} characters",
}


@dataclass(frozen=True, slots=True)
class Leaf:
    path: tuple[str, ...]
    op: str
    value: Any = None
    regexes: tuple[SafeRegex, ...] = ()
    window: TimeWindow | None = None
    label: str = ""
    error: str | None = None  # the rule-error message, for operators that can fail


@dataclass(frozen=True, slots=True)
class Node:
    kind: str  # all | any | not
    children: tuple[Leaf | Node, ...]


@dataclass(frozen=True, slots=True)
class LoweredRule:
    index: int
    id: str
    outcome: RuleOutcome
    shadow: bool
    tools: tuple[str, ...] | None  # None: any tool
    match: tuple[Leaf, ...]  # selectors other than the tool, all must hold
    tool_leaf: Leaf | None
    when: Leaf | Node | None

    @property
    def can_error(self) -> bool:
        return self.when is not None and any(leaf.error for leaf in leaves(self.when))


@dataclass(frozen=True, slots=True)
class LoweredPolicy:
    name: str
    mode: str
    rules: tuple[LoweredRule, ...]

    @property
    def has_shadow(self) -> bool:
        return self.mode == "shadow" or any(r.shadow for r in self.rules)


def leaves(node: Leaf | Node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    return [leaf for child in node.children for leaf in leaves(child)]


def _label(path: tuple[str, ...], op: str, value: Any) -> str:
    return f"{'.'.join(path)} {op} {json.dumps(value, sort_keys=True, ensure_ascii=False)}"


def _head_as_get(op: str, value: Any) -> tuple[str, Any]:
    """A test of the method naming ``GET`` names ``HEAD`` too: common servers (Express, Rails,
    Flask, Django, Starlette) answer HEAD with the GET handler, so a rule denying a GET must not
    be passed by the same call sent as HEAD."""
    if op in ("eq", "ne") and value == "GET":
        return ("in" if op == "eq" else "not_in"), ["GET", "HEAD"]
    if op in ("in", "not_in") and "GET" in value and "HEAD" not in value:
        return op, [*value, "HEAD"]
    return op, value


def _comparison_error(
    rule_id: str, path: tuple[str, ...], label: str, types: frozenset[str], whole: bool
) -> str:
    if path[:2] in _STRING_ROOTS and "string" not in types:
        need = " or ".join(f"a {t}" for t in _SCALAR_ORDER if t in types)
        return (
            f"policy_error: rule {rule_id}: {label} needs {need}; query and header values are"
            " always strings: write the rule's values quoted"
        )
    names = [
        "a whole number" if t == "number" and whole else f"a {t}"
        for t in _SCALAR_ORDER
        if t in types
    ]
    need = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    head = f"policy_error: rule {rule_id}: {label} needs {need}"
    if whole:
        return (
            f'{head}; servers convert strings, numbers and booleans into one another ("42" to 42,'
            ' 1 or "true" to true) and drop the fraction of a number bound to an integer (42.5 to'
            " 42), so a value of another type or a number with a fraction is refused: send"
            f" {need}, or write the rule for the value sent"
        )
    return (
        f'{head}; servers convert strings, numbers and booleans into one another ("42" to 42,'
        f' 1 or "true" to true), so a value of another type is refused: send {need}, or write'
        " the rule for the type sent"
    )


def _leaf(rule_id: str, path: tuple[str, ...], op: str, value: Any) -> Leaf:
    label = _label(path, op, value)
    if path == ("method",):
        op, value = _head_as_get(op, value)
    regexes: tuple[SafeRegex, ...] = ()
    if op == "regex":
        regexes = (compile_safe(value),)
    elif op == "glob":
        regexes = tuple(glob_to_regex(g) for g in value)
    error = None
    if op in _NEEDS:
        error = f"policy_error: rule {rule_id}: {label} needs {_NEEDS[op]}"
    elif op in COMPARING_OPERATORS:
        literals = value if op in ("in", "not_in") else (value,)
        types, whole = scalar_types(literals), whole_numbers(literals)
        # With every scalar type held and a fraction allowed, no value can be refused.
        if types and (len(types) < len(_SCALAR_ORDER) or whole):
            error = _comparison_error(rule_id, path, label, types, whole)
    return Leaf(path=path, op=op, value=value, regexes=regexes, label=label, error=error)


def _condition(rule_id: str, cond: Condition) -> Leaf | Node:
    op = cond.operator
    if op in ("all", "any"):
        return Node(op, tuple(_condition(rule_id, c) for c in cond.operand))
    if op == "not":
        return Node("not", (_condition(rule_id, cond.operand),))
    if op == "time":
        window: TimeWindow = cond.operand
        label = f"time window {json.dumps(window.model_dump(mode='json', exclude_none=True), sort_keys=True)}"
        return Leaf(
            path=("time", "unix"),
            op="time",
            window=window,
            label=label,
            error=f"policy_error: rule {rule_id}: {label} needs time.unix in whole seconds "
            "before 2100",
        )
    assert cond.path is not None
    return _leaf(rule_id, tuple(cond.path.split(".")), op, cond.operand)


def _selectors(rule: Rule) -> list[Leaf]:
    m, rid, out = rule.match, rule.id, []
    if m.resources:
        out.append(_leaf(rid, ("resource",), "glob", list(m.resources)))
    for name, values in (("method", m.methods), ("tenant", m.tenants), ("env", m.envs)):
        if values:
            out.append(_leaf(rid, (name,), "in", list(values)))
    if m.auth_methods:
        out.append(_leaf(rid, ("auth", "method"), "in", list(m.auth_methods)))
    if m.agent is not None:
        if m.agent.ids:
            out.append(_leaf(rid, ("agent", "id"), "in", list(m.agent.ids)))
        if m.agent.roles:
            out.append(_leaf(rid, ("agent", "roles"), "intersects", list(m.agent.roles)))
        for key, value in sorted((m.agent.attributes or {}).items()):
            out.append(_leaf(rid, ("agent", "attributes", key), "eq", value))
    out.extend(_leaf(rid, ("token", "scopes"), "contains", s) for s in m.scopes or ())
    if m.chain is not None:
        c = m.chain
        if c.parents:
            out.append(_leaf(rid, ("chain", "parent"), "in", list(c.parents)))
        if c.origin_users:
            out.append(_leaf(rid, ("chain", "origin_user"), "in", list(c.origin_users)))
        if c.min_depth is not None:
            out.append(_leaf(rid, ("chain", "depth"), "gte", c.min_depth))
        if c.max_depth is not None:
            out.append(_leaf(rid, ("chain", "depth"), "lte", c.max_depth))
    # Selectors read fields that build_input always fills with the right type; they never fail
    # (``agent.attributes`` values are registry data, compared strictly as before).
    return [Leaf(**{**_fields(leaf), "error": None}) for leaf in out]


def _fields(leaf: Leaf) -> dict[str, Any]:
    return {f: getattr(leaf, f) for f in Leaf.__dataclass_fields__}


def _outcome(rule: Rule) -> RuleOutcome:
    obligations = tuple(
        sorted(
            SanitizeObligation(o.kind, o.target, o.path, o.pattern, o.header)
            for o in rule.obligations or ()
        )
    )
    approval = None
    if rule.approval is not None:
        a = rule.approval
        approval = ApprovalRequirement(a.group, a.channel, a.expires_in)
    return RuleOutcome(rule.id, rule.action, rule.effective_reason, obligations, approval)


def lower(doc: PolicyDocument) -> LoweredPolicy:
    """Lower a validated document; never fails on a document that passed the loader. Rule ids
    are unique there; a document that reached here otherwise (a stored row written around the
    loader) is refused: the Rego bundle keys rules by id, and two rules of one id would read
    one's hit as the other's outcome (a deny's as an allow)."""
    ids = [rule.id for rule in doc.spec.rules]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise PolicyError(f"rule ids must be unique; repeated: {', '.join(twice)}")
    rules = []
    for i, rule in enumerate(doc.spec.rules):
        tools = tuple(rule.match.tools) if rule.match.tools else None
        rules.append(
            LoweredRule(
                index=i,
                id=rule.id,
                outcome=_outcome(rule),
                shadow=rule.shadow or doc.spec.mode == "shadow",
                tools=tools,
                match=tuple(_selectors(rule)),
                tool_leaf=_leaf(rule.id, ("tool",), "glob", list(tools)) if tools else None,
                when=_condition(rule.id, rule.when) if rule.when is not None else None,
            )
        )
    return LoweredPolicy(name=doc.metadata.name, mode=doc.spec.mode, rules=tuple(rules))
