"""The real Rego engine (regorus, Rego v1) loaded with a generated bundle, for differential tests.

Values cross the boundary as JSON text: regorus's Python conversion maps ``False`` to ``0``
(``bool`` is an ``int`` subclass), which would silently change what the policy sees.
"""

from __future__ import annotations

import json
from typing import Any

import regorus

from aegis.policy.evaluator import CompiledPolicy
from aegis.policy.rego import DECISION_QUERY, data_document, to_rego


class RegoEngine:
    def __init__(self, policy: CompiledPolicy) -> None:
        self.engine = regorus.Engine()
        self.engine.add_policy("policy.rego", to_rego(policy))
        self.engine.add_data_json(json.dumps(data_document(policy)))

    def evaluate(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.engine.set_input_json(json.dumps(doc))
        result: dict[str, Any] = json.loads(self.engine.eval_rule_as_json(DECISION_QUERY))
        return result


def normalise(decision: dict[str, Any]) -> dict[str, Any]:
    """Order-free form of a decision dict: obligation and approval lists sorted as JSON."""

    def sort_json(items: list[Any]) -> list[Any]:
        return sorted(items, key=lambda x: json.dumps(x, sort_keys=True))

    out = dict(decision)
    out["obligations"] = sort_json(out["obligations"])
    out["approvals"] = sort_json(out["approvals"])
    if out.get("shadow") is not None:
        out["shadow"] = normalise({**out["shadow"], "shadow": None})
        del out["shadow"]["shadow"]
    return out
