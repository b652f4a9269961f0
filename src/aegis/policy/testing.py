"""Policy unit tests, in the spirit of ``opa test``: YAML cases run against a policy file.

A test file (``*_test.yaml``) names its policy (``policy:``, relative to the test file; default: the
test file's name without ``_test``) and lists ``cases``, each with a ``note``, an ``input`` (a call
in the JSON form of :class:`~aegis.policy.input.PolicyCall`) and ``want: {action, reasons?,
rule_ids?}``. Reasons and rule ids are compared as sorted lists. A failure carries a diff.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aegis.errors import AegisError
from aegis.policy.evaluator import compile_policy
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.loader import load_file
from aegis.policy.readings import decide_readings
from aegis.policy.yamlsource import parse_source

__all__ = ["CaseResult", "discover", "run_file", "run_path"]


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    note: str
    passed: bool
    want: dict[str, Any]
    got: dict[str, Any]
    diff: str = ""
    error: str | None = None


@dataclass
class _Wanted:
    action: str
    fields: dict[str, Any] = field(default_factory=dict)


def discover(path: str | Path) -> list[Path]:
    """A test file itself, or every ``*_test.yaml`` / ``*_test.yml`` below a directory."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted([*p.rglob("*_test.yaml"), *p.rglob("*_test.yml")])


def _diff(want: dict[str, Any], got: dict[str, Any]) -> str:
    a = json.dumps(want, indent=2, sort_keys=True).splitlines()
    b = json.dumps(got, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "want", "got", lineterm=""))


def _failure(file: str, note: str, message: str) -> CaseResult:
    return CaseResult(file, note, False, {}, {}, error=message)


def run_file(path: str | Path) -> list[CaseResult]:
    """Run every case of one test file."""
    p = Path(path)
    try:
        src = parse_source(p.read_bytes(), str(p))
        spec = src.value
        if not isinstance(spec, dict) or not isinstance(spec.get("cases"), list):
            raise ValueError("a test file needs a 'cases' list")
        stem = p.name.removesuffix(".yaml").removesuffix(".yml").removesuffix("_test")
        policy_path = p.parent / str(spec.get("policy") or f"{stem}.yaml")
        policy = compile_policy(load_file(policy_path))
    except (AegisError, OSError, ValueError) as exc:
        return [_failure(str(p), "<file>", str(exc))]
    results = []
    for i, case in enumerate(spec["cases"]):
        note = str(case.get("note", f"case {i}")) if isinstance(case, dict) else f"case {i}"
        line = src.line_of(("cases", i))
        where = f"{p}:{line}"
        try:
            if not isinstance(case, dict) or not isinstance(case.get("want"), dict):
                raise ValueError("a case needs 'input' and 'want'")
            want = dict(case["want"])
            unknown = sorted(set(want) - {"action", "reasons", "rule_ids"})
            if unknown or "action" not in want:
                raise ValueError("want takes action and optionally reasons, rule_ids")
            # Decided as the gateway and the dry run decide it: under each reading of its path.
            doc = build_input(call_from_dict(case.get("input") or {}))
            decision = decide_readings(policy, doc, policy.evaluate(doc))
        except (AegisError, ValueError) as exc:
            results.append(_failure(where, note, str(exc)))
            continue
        full = decision.to_dict()
        got = {k: full[k] for k in want}
        for k in ("reasons", "rule_ids"):
            if k in want:
                want[k] = sorted(want[k])
        passed = got == want
        results.append(
            CaseResult(where, note, passed, want, got, "" if passed else _diff(want, got))
        )
    return results


def run_path(path: str | Path) -> list[CaseResult]:
    """Run every test file found under ``path``."""
    files = discover(path)
    if not files:
        return [_failure(str(path), "<discover>", "no *_test.yaml files found")]
    return [r for f in files for r in run_file(f)]
