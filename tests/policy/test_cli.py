"""``aegis policy`` commands, through typer's runner."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aegis.cli.policy import app
from tests.policy.conftest import REPO

RUNNER = CliRunner()
PAYMENTS = str(REPO / "examples" / "policies" / "payments.yaml")


@pytest.mark.parametrize("command", ["validate", "build", "eval", "test", "shadow-report"])
def test_every_command_has_help(command: str) -> None:
    result = RUNNER.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "--json" in result.output


def test_validate_ok_and_json() -> None:
    result = RUNNER.invoke(app, ["validate", PAYMENTS, "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["rules"] == 8


def test_validate_failure_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n    - {id: a, action: alow}\n"
    )
    result = RUNNER.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert f"{bad}:6:" in result.output
    as_json = json.loads(RUNNER.invoke(app, ["validate", str(bad), "--json"]).output)
    assert as_json["error"]["code"] == "policy_invalid"
    assert as_json["error"]["line"] == 6


def test_a_policy_file_that_cannot_be_read_is_unreadable_input(tmp_path: Path) -> None:
    """docs/policy.md: failures exit 1 (policy invalid) or 2 (unreadable input). A missing
    policy file made validate, build and eval exit 1, as if the policy were invalid."""
    missing = str(tmp_path / "missing.yaml")
    call = tmp_path / "call.json"
    call.write_text('{"tool": "payments.transfer"}')
    for args in (["validate", missing], ["build", missing, "--out", str(tmp_path / "b")],
                 ["eval", "--policy", missing, "--input", str(call)]):  # fmt: skip
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "cannot read the policy file" in result.output and "missing.yaml" in result.output
        as_json = RUNNER.invoke(app, [*args, "--json"])
        assert json.loads(as_json.output)["error"]["code"] == "invalid_request"


def test_build_writes_a_loadable_bundle(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["build", PAYMENTS, "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0
    with tarfile.open(tmp_path / "b" / "bundle.tar.gz") as tar:
        assert sorted(tar.getnames()) == [".manifest", "data.json", "policy.rego"]
    manifest = json.loads((tmp_path / "b" / ".manifest").read_text())
    assert manifest["revision"] == json.loads(result.output)["version"]
    # Same policy, same bytes: bundles are reproducible.
    RUNNER.invoke(app, ["build", PAYMENTS, "--out", str(tmp_path / "c")])
    assert (tmp_path / "b" / "bundle.tar.gz").read_bytes() == (
        tmp_path / "c" / "bundle.tar.gz"
    ).read_bytes()


def test_eval_prints_the_decision_and_trace(tmp_path: Path) -> None:
    call = tmp_path / "call.json"
    call.write_text(json.dumps({"tool": "crm.get", "time": 1736935200}))
    result = RUNNER.invoke(app, ["eval", "--policy", PAYMENTS, "--input", str(call)])
    assert result.exit_code == 0
    assert result.output.startswith("decision: sanitize")
    assert "[match] crm-sanitize-responses" in result.output
    data = json.loads(
        RUNNER.invoke(app, ["eval", "--policy", PAYMENTS, "--input", str(call), "--json"]).output
    )
    assert data["decision"]["obligations"]


def test_eval_with_unreadable_input_exits_2(tmp_path: Path) -> None:
    result = RUNNER.invoke(
        app, ["eval", "--policy", PAYMENTS, "--input", str(tmp_path / "none.json")]
    )
    assert result.exit_code == 2
    assert "cannot read input" in result.output


def test_test_command_passes_on_the_examples() -> None:
    result = RUNNER.invoke(app, ["test", str(REPO / "examples" / "policies")])
    assert result.exit_code == 0, result.output
    assert "16 passed, 0 failed" in result.output


def test_test_command_fails_with_a_diff(tmp_path: Path) -> None:
    (tmp_path / "payments.yaml").write_text(Path(PAYMENTS).read_text())
    (tmp_path / "payments_test.yaml").write_text(
        "cases:\n  - note: wrong on purpose\n    input: {tool: crm.get}\n    want: {action: allow}\n"
    )
    result = RUNNER.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAIL" in result.output
    assert '-  "action": "allow"' in result.output
    assert '+  "action": "sanitize"' in result.output
    data = json.loads(RUNNER.invoke(app, ["test", str(tmp_path), "--json"]).output)
    assert data["failed"] == 1


def test_test_command_decides_under_each_reading_of_the_path(tmp_path: Path) -> None:
    """A policy test decides as the gateway and the dry run do: ``/admin.json`` is also read as
    ``/admin`` (Rails), which a rule denies, so a case wanting ``allow`` fails."""
    (tmp_path / "p.yaml").write_text(
        "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "    - {id: allow-api, action: allow, match: {tools: [api]}}\n"
        "    - {id: deny-admin, action: deny, when: {path: path_loose, eq: /admin}}\n"
    )
    (tmp_path / "p_test.yaml").write_text(
        "cases:\n  - note: admin as json\n    input: {tool: api, method: GET, path: /admin.json}"
        "\n    want: {action: deny, rule_ids: [deny-admin]}\n"
    )
    result = RUNNER.invoke(app, ["test", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 passed, 0 failed" in result.output


def test_test_command_fails_when_there_is_nothing_to_run(tmp_path: Path) -> None:
    assert RUNNER.invoke(app, ["test", str(tmp_path)]).exit_code == 1


def test_shadow_report(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    shadow = {"action": "deny", "rule_ids": ["r"], "reasons": []}
    log.write_text(
        json.dumps(
            {
                "time": 10,
                "tool": "t",
                "agent": "a",
                "decision": {"action": "allow", "shadow": shadow},
            }
        )
        + "\n"
    )
    result = RUNNER.invoke(
        app, ["shadow-report", "--log", str(log), "--json", "--since", "0", "--until", "20"]
    )
    assert result.exit_code == 0
    assert json.loads(result.output)["by_rule"] == {"r": 1}
    assert RUNNER.invoke(app, ["shadow-report", "--log", str(log), "--last", "soon"]).exit_code == 2
