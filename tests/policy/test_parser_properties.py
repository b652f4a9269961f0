"""Parser properties: loading never crashes with anything but PolicyError, and round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.errors import PolicyError
from aegis.policy.loader import load_document
from aegis.policy.version import policy_version
from tests.policy.conftest import CORPUS

KEYS = st.sampled_from(
    ["apiVersion", "kind", "metadata", "spec", "rules", "id", "action", "when", "path", "eq", "lt", "in",
     "all", "not", "regex", "match", "tools", "name", "mode", "x"]
)  # fmt: skip
VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.sampled_from(["aegis/v1", "Policy", "allow", "deny", "tool", "(a+)+", "a"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _failure(text: str, file: str) -> PolicyError | None:
    """Load ``text``; any exception other than PolicyError propagates and fails the test."""
    try:
        load_document(text, file)
    except PolicyError as exc:
        return exc
    return None


@settings(max_examples=200, deadline=None, derandomize=True)
@given(doc=st.dictionaries(KEYS, VALUES, max_size=5))
def test_arbitrary_documents_fail_only_with_policy_error(doc: dict[str, Any]) -> None:
    failure = _failure(json.dumps(doc), "fuzz.json")
    if failure is not None:
        assert failure.code == "policy_invalid"
        assert failure.message.startswith("fuzz.json")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(text=st.text(max_size=80))
def test_arbitrary_text_fails_only_with_policy_error(text: str) -> None:
    failure = _failure(text, "fuzz.yaml")
    assert failure is None or failure.code == "policy_invalid"


@pytest.mark.parametrize("policy_file", CORPUS, ids=lambda p: p.stem)
def test_canonical_form_round_trips_to_the_same_version(policy_file: Path) -> None:
    doc = load_document(policy_file.read_bytes(), str(policy_file))
    canonical = doc.canonical()
    again_json = load_document(json.dumps(canonical))
    again_yaml = load_document(yaml.safe_dump(canonical, sort_keys=False))
    assert policy_version(again_json) == policy_version(again_yaml) == policy_version(doc)
