"""The JSON Schema (draft 2020-12) of ``aegis/v1`` policies, generated from the pydantic model.

``docs/policy-schema.json`` is this function's output; a test keeps the two equal. Regenerate with
``python -m aegis.policy.schema > docs/policy-schema.json``.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aegis.policy.model import PolicyDocument

__all__ = ["SCHEMA_ID", "policy_json_schema", "schema_text"]

SCHEMA_ID: Final = "https://aegis.dev/schemas/policy/v1.json"


def policy_json_schema() -> dict[str, Any]:
    schema = PolicyDocument.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(schema_text(), end="")
