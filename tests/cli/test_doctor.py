"""``aegis doctor``: the token lifetime warning and the high-risk-tool delegation check."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from aegis.cli.doctor import app, check_config, check_high_risk_rules
from aegis.config import load_config


@dataclass(frozen=True)
class Rule:
    id: str
    tools: Sequence[str]
    allows: bool = True
    requires_parent: bool = False


def _config(tmp_path: Path, yaml: str = "") -> Path:
    (tmp_path / ".aegis").mkdir(exist_ok=True)
    for name in ("kek", "pepper"):
        (tmp_path / ".aegis" / name).write_text(base64.b64encode(os.urandom(32)).decode())
    path = tmp_path / "aegis.yaml"
    path.write_text("issuer: http://127.0.0.1:8080\n" + yaml)
    return path


def test_lifetime_above_one_hour_warns(tmp_path: Path) -> None:
    assert check_config(load_config(_config(tmp_path), environ={})) == []
    long = load_config(_config(tmp_path, "tokens:\n  max_lifetime: 7200\n"), environ={})
    [finding] = check_config(long)
    assert (finding.level, finding.check, finding.subject) == (
        "warn",
        "token_lifetime",
        "tokens.max_lifetime",
    )
    assert "7200" in finding.message


def test_high_risk_tool_without_parent_is_flagged() -> None:
    rules = [
        Rule("open-payments", ["payments.*"]),
        Rule("everything", ["*"]),
        Rule("payments-via-parent", ["payments.transfer"], requires_parent=True),
        Rule("deny-payments", ["payments.*"], allows=False),
        Rule("read-docs", ["docs.read"]),
    ]
    findings = check_high_risk_rules(rules, ["payments.transfer", "db.drop_*"])
    assert [f.subject for f in findings] == ["open-payments", "everything"]
    assert all(f.level == "error" for f in findings)
    assert "payments.transfer" in findings[0].message
    assert check_high_risk_rules(rules, []) == []


def test_cli_exit_status(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["--config", str(_config(tmp_path))])
    assert ok.exit_code == 0
    assert "ok: no findings" in ok.output
    warn = _config(tmp_path, "tokens:\n  max_lifetime: 7200\n")
    assert runner.invoke(app, ["--config", str(warn)]).exit_code == 0
    strict = runner.invoke(app, ["--config", str(warn), "--strict"])
    assert strict.exit_code == 1
    assert "warn: token_lifetime" in strict.output
    missing = runner.invoke(app, ["--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1
