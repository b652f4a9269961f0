"""Regenerate the golden Rego files: ``python -m tests.policy.regen_golden``.

Run it after an intended change to the Rego generator, review the diff of
``tests/policy/golden/*.rego`` like any other code change, and commit it with the generator.
"""

from __future__ import annotations

from pathlib import Path

from aegis.policy.evaluator import compile_policy
from aegis.policy.loader import load_file
from aegis.policy.rego import to_rego

HERE = Path(__file__).parent


def golden_text(policy_file: Path) -> str:
    return to_rego(compile_policy(load_file(policy_file)))


def main() -> None:
    for policy_file in sorted((HERE / "corpus").glob("*.yaml")):
        target = HERE / "golden" / f"{policy_file.stem}.rego"
        target.write_text(golden_text(policy_file))
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
