"""Dry runs: the full decision for one call, with a trace of every rule, changing nothing.

The decision comes from the same :meth:`CompiledPolicy.evaluate` the gateway uses, under each
reading of the path as the gateway decides it (:func:`~aegis.policy.readings.decide_readings`); the
trace is computed separately, leaf by leaf, for every rule (not only the index candidates) so that
a policy author sees why each rule did or did not match. Nothing is stored, counted or emitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aegis.policy.evaluator import CompiledPolicy, CompiledRule, compile_policy
from aegis.policy.input import PolicyCall, build_input, call_from_dict
from aegis.policy.ir import Leaf, Node
from aegis.policy.model import PolicyDocument
from aegis.policy.predicates import compile_node
from aegis.policy.readings import decide_readings
from aegis.policy.store import PolicyStore

__all__ = ["dry_run", "explain_rule"]


def _leaf_result(leaf: Leaf, doc: dict[str, Any]) -> str:
    errors: list[str] = []
    ok = compile_node(leaf, eager=True)(doc, errors)
    return "error" if errors else ("pass" if ok else "fail")


def _tree(node: Leaf | Node, doc: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, Leaf):
        return {"check": node.label, "result": _leaf_result(node, doc)}
    errors: list[str] = []
    ok = compile_node(node, eager=True)(doc, errors)
    return {
        "check": node.kind,
        "result": "error" if errors else ("pass" if ok else "fail"),
        "children": [_tree(c, doc) for c in node.children],
    }


def explain_rule(policy: CompiledPolicy, rule: CompiledRule, doc: dict[str, Any]) -> dict[str, Any]:
    """Why one rule matched, failed, or errored for ``doc``."""
    low = rule.lowered
    candidate = rule in policy.candidates(doc.get("tool"))
    selectors = [{"check": leaf.label, "result": _leaf_result(leaf, doc)} for leaf in (
        ((low.tool_leaf,) if low.tool_leaf else ()) + low.match)]  # fmt: skip
    when = _tree(low.when, doc) if low.when is not None else None
    matched, errors = rule.run(doc) if candidate else (False, [])
    if errors:
        why = "rule error: " + "; ".join(errors)
    elif matched:
        why = "all selectors and conditions hold"
    elif not candidate:
        why = "tool selector does not match"
    else:
        failing = [s["check"] for s in selectors if s["result"] != "pass"]
        why = f"selector fails: {failing[0]}" if failing else "condition 'when' is false"
    return {
        "id": low.id,
        "action": low.outcome.action,
        "shadow": low.shadow,
        "matched": matched,
        "errors": errors,
        "why": why,
        "selectors": selectors,
        "when": when,
    }


def _policy(
    policy: CompiledPolicy | PolicyDocument | str, store: PolicyStore | None
) -> CompiledPolicy:
    if isinstance(policy, CompiledPolicy):
        return policy
    if isinstance(policy, PolicyDocument):
        return compile_policy(policy)
    if store is None:
        raise ValueError("a policy version needs a store to read it from")
    return compile_policy(store.get(policy), version=policy)


def dry_run(
    policy: CompiledPolicy | PolicyDocument | str,
    call: PolicyCall | Mapping[str, Any],
    *,
    store: PolicyStore | None = None,
) -> dict[str, Any]:
    """Evaluate ``call`` (a :class:`PolicyCall` or its JSON form) against a policy or a stored
    version, and return ``{"policy_version", "input", "decision", "trace"}``."""
    compiled = _policy(policy, store)
    doc = build_input(call if isinstance(call, PolicyCall) else call_from_dict(call))
    # Under each reading of the path some upstream serves the call as, as the gateway decides
    # it; for a policy that reads no path_loose, every reading gives the same decision.
    decision = decide_readings(compiled, doc, compiled.evaluate(doc))
    return {
        "policy_version": compiled.version,
        "input": doc,
        "decision": decision.to_dict(),
        "trace": [explain_rule(compiled, r, doc) for r in compiled.rules],
    }
