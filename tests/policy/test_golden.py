"""Golden files pin the generated Rego for every corpus policy.

A failure here means the generator's output changed. If the change is intended, regenerate with
``python -m tests.policy.regen_golden`` and review the diff; the differential tests prove the new
output still decides like the evaluator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.policy.conftest import CORPUS, HERE
from tests.policy.regen_golden import golden_text


@pytest.mark.parametrize("policy_file", CORPUS, ids=lambda p: p.stem)
def test_generated_rego_matches_golden(policy_file: Path) -> None:
    golden = HERE / "golden" / f"{policy_file.stem}.rego"
    assert golden.exists(), f"missing {golden}; run python -m tests.policy.regen_golden"
    assert golden_text(policy_file) == golden.read_text()


def test_every_golden_file_has_a_policy() -> None:
    stems = {p.stem for p in CORPUS}
    assert {g.stem for g in (HERE / "golden").glob("*.rego")} == stems


def test_generation_is_deterministic() -> None:
    assert golden_text(CORPUS[0]) == golden_text(CORPUS[0])
