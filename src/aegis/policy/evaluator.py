"""The in-process policy evaluator: rules indexed by tool, decisions combined without order.

Cost stays flat as a policy grows: rules naming exact tools sit in a dict, rules with tool globs in
a short list, rules with no tool selector in another; the candidate list for a tool name is
computed once and cached (bounded, so unknown tool names cannot grow memory). Only candidates are
evaluated. Any unexpected exception is a ``deny`` with code ``policy_error`` - fail closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aegis.policy.decision import SHADOW_POLICY_REASON, Decision, Outcome, RuleOutcome, combine
from aegis.policy.ir import LoweredPolicy, LoweredRule, lower
from aegis.policy.model import PolicyDocument
from aegis.policy.predicates import Pred, compile_node
from aegis.policy.safe_regex import glob_to_regex
from aegis.policy.version import policy_version

__all__ = [
    "EVALUATION_FAILED",
    "MAX_CACHED_TOOLS",
    "CompiledPolicy",
    "CompiledRule",
    "compile_policy",
]

#: Distinct tool names whose candidate lists are cached; the cache is cleared when full.
MAX_CACHED_TOOLS: Final = 4096
EVALUATION_FAILED: Final = "policy_error: evaluation failed; the call is denied"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    lowered: LoweredRule
    match: tuple[Pred, ...]
    when: Pred | None

    @property
    def id(self) -> str:
        return self.lowered.id

    def run(self, doc: Any) -> tuple[bool, list[str]]:
        """(matched, errors) for this rule, ignoring its tool selector (the index applied it)."""
        scratch: list[str] = []
        for pred in self.match:
            if not pred(doc, scratch):
                return False, []
        if self.when is None:
            return True, []
        errors: list[str] = []
        ok = self.when(doc, errors)
        return (ok and not errors), errors


def _compile_rule(rule: LoweredRule) -> CompiledRule:
    when = None
    if rule.when is not None:
        when = compile_node(rule.when, eager=rule.can_error)
    match = tuple(compile_node(leaf, eager=False) for leaf in rule.match)
    return CompiledRule(lowered=rule, match=match, when=when)


class CompiledPolicy:
    """One policy version, ready to decide. Immutable after construction; safe to share."""

    def __init__(self, doc: PolicyDocument, *, version: str | None = None) -> None:
        self.document = doc
        self.version = version or policy_version(doc)
        self.lowered: LoweredPolicy = lower(doc)
        self.rules = tuple(_compile_rule(r) for r in self.lowered.rules)
        self._exact: dict[str, list[CompiledRule]] = {}
        self._globs: list[tuple[Callable[[str], Any], CompiledRule]] = []
        self._any: list[CompiledRule] = []
        for rule in self.rules:
            tools = rule.lowered.tools
            if tools is None:
                self._any.append(rule)
                continue
            for tool in tools:
                if "*" in tool:
                    self._globs.append((glob_to_regex(tool).python.match, rule))
                else:
                    self._exact.setdefault(tool, []).append(rule)
        self._cache: dict[str, tuple[CompiledRule, ...]] = {}
        self._has_shadow = self.lowered.has_shadow
        self._shadow_mode = self.lowered.mode == "shadow"

    def candidates(self, tool: Any) -> tuple[CompiledRule, ...]:
        """The rules whose tool selector matches ``tool``, in document order."""
        if type(tool) is not str:
            return tuple(self._any)
        cached = self._cache.get(tool)
        if cached is not None:
            return cached
        found = {id(r): r for r in self._exact.get(tool, ())}
        found.update({id(r): r for m, r in self._globs if m(tool)})
        found.update({id(r): r for r in self._any})
        result = tuple(sorted(found.values(), key=lambda r: r.lowered.index))
        if len(self._cache) >= MAX_CACHED_TOOLS:
            self._cache.clear()
        self._cache[tool] = result
        return result

    def evaluate(self, doc: dict[str, Any]) -> Decision:
        """Decide one input document (from :func:`aegis.policy.input.build_input`)."""
        try:
            return self._evaluate(doc)
        except Exception:  # fail closed: a bug or a hostile input is a deny, never an allow
            return Decision(
                action="deny",
                reasons=(EVALUATION_FAILED,),
                rule_ids=(),
                policy_version=self.version,
                code="policy_error",
            )

    def _evaluate(self, doc: dict[str, Any]) -> Decision:
        errors: list[tuple[str, str]] = []
        hits: list[RuleOutcome] = []
        shadow_errors: list[tuple[str, str]] = []
        shadow_hits: list[RuleOutcome] = []
        for rule in self.candidates(doc.get("tool")):
            matched, errs = rule.run(doc)
            shadow = rule.lowered.shadow
            if errs:
                (shadow_errors if shadow else errors).extend((rule.id, m) for m in errs)
            elif matched:
                (shadow_hits if shadow else hits).append(rule.lowered.outcome)
        shadow_outcome: Outcome | None = None
        if self._has_shadow:
            shadow_outcome = combine(errors + shadow_errors, hits + shadow_hits)
        if self._shadow_mode:
            enforced = Outcome("allow", (SHADOW_POLICY_REASON,), (), None)
        else:
            enforced = combine(errors, hits)
        return Decision.from_outcome(enforced, self.version, shadow_outcome)

    def could_allow(self, doc: dict[str, Any]) -> bool:
        """Whether a call with ``doc``'s tool, agent, token and chain could be decided other
        than ``deny``, whatever its request (body, query, headers) holds: False only when no
        enforced rule but a deny can match on those facts alone, or an enforced deny rule
        without conditions matches. Conditions are never read (they may read the request), so
        this errs towards True. For listing what an agent may call, never for deciding."""
        if self._shadow_mode:
            return True
        scratch: list[str] = []
        possible = False
        for rule in self.candidates(doc.get("tool")):
            if rule.lowered.shadow or not all(pred(doc, scratch) for pred in rule.match):
                continue
            if rule.lowered.outcome.action != "deny":
                possible = True
            elif rule.when is None:
                return False
        return possible


def compile_policy(doc: PolicyDocument, *, version: str | None = None) -> CompiledPolicy:
    """Compile a validated document; ``version`` defaults to its content address."""
    return CompiledPolicy(doc, version=version)
