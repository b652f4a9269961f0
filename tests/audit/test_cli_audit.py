"""``aegis audit`` and ``aegis attest`` through the real CLI on an `aegis init` setup."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aegis.audit.attest import Attester, request_digest
from aegis.audit.log import AuditLog
from aegis.cli.main import app
from aegis.config import load_config
from aegis.server.services import Services, build_services
from tests.audit.conftest import dumps, fill, loads


class Cli:
    def __init__(self, directory: Path) -> None:
        self.directory, self.config = directory, directory / "aegis.yaml"
        self.runner = CliRunner()

    def run(self, *args: str) -> Result:
        return self.runner.invoke(app, ["--config", str(self.config), *args])

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def fails(self, *args: str, code: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {code}"), result.stderr
        assert result.stdout == "" and "Traceback" not in result.output
        return lines[0]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    c.json("init", "--dir", str(tmp_path))
    return c


@pytest.fixture
def services(cli: Cli) -> Iterator[Services]:
    s = build_services(load_config(cli.config, environ={}))
    yield s
    asyncio.run(s.aclose())


@pytest.fixture
def log(services: Services) -> Iterator[AuditLog]:
    audit = AuditLog(services.config.database_url(), clock=services.clock)
    yield audit
    audit.close()


def test_checkpoint_export_verify_and_a_tampered_export(
    cli: Cli, log: AuditLog, tmp_path: Path
) -> None:
    fill(log, 5)
    assert cli.json("audit", "checkpoint")["tree_size"] == 5
    fill(log, 2, start=5)
    out, jwks = tmp_path / "export.jsonl", tmp_path / "jwks.json"
    assert cli.json("audit", "export", str(out))["records"] == 7
    jwks.write_text(cli.run("jwks").stdout)
    ok = cli.json("audit", "verify", str(out), "--jwks", str(jwks))
    assert (ok["ok"], ok["records"], ok["checkpoints"]) == (True, 7, 2)
    human = cli.run("audit", "verify", str(out), "--jwks", str(jwks))
    assert human.exit_code == 0 and human.stdout.startswith("ok: 7 records")
    lines = out.read_text().splitlines()
    obj = loads(lines[3])
    obj["record"] = obj["record"].replace("allow", "deny!")
    lines[3] = dumps(obj)
    out.write_text("\n".join(lines) + "\n")
    line = cli.fails("audit", "verify", str(out), "--jwks", str(jwks), code="evidence_invalid")
    assert "line 4, position 3: record_edited" in line
    assert "ok" not in cli.run("audit", "verify", str(out), "--jwks", str(jwks)).stdout


def test_prove_and_check_proof_offline(cli: Cli, log: AuditLog, tmp_path: Path) -> None:
    fill(log, 6)
    proof = cli.run("audit", "prove", "d-3")
    assert proof.exit_code == 0, proof.output
    doc = json.loads(proof.stdout)
    assert (doc["seq"], doc["tree_size"]) == (4, 6)
    jwks, file = tmp_path / "jwks.json", tmp_path / "proof.json"
    jwks.write_text(cli.run("jwks").stdout)
    file.write_text(proof.stdout)
    assert cli.json("audit", "check-proof", str(file), "--jwks", str(jwks))["tree_sizes"] == [6]
    # The real record repeated after another: Python reads the last, which verifies; a checker
    # keeping the first would be shown the other as proven.
    forged = doc["record"].replace("d-3", "d-9")
    file.write_text('{"record":' + json.dumps(forged) + "," + json.dumps(doc)[1:])
    cli.fails("audit", "check-proof", str(file), "--jwks", str(jwks), code="invalid_proof")
    doc["record"] = forged
    file.write_text(json.dumps(doc))
    cli.fails("audit", "check-proof", str(file), "--jwks", str(jwks), code="invalid_proof")
    cli.fails("audit", "prove", "no-such-decision", code="not_found")
    # Consistency between two stored checkpoints.
    fill(log, 5, start=6)
    cli.json("audit", "checkpoint")
    consistency = cli.run("audit", "consistency", "6", "11")
    file.write_text(consistency.stdout)
    assert cli.json("audit", "check-proof", str(file), "--jwks", str(jwks))["tree_sizes"] == [6, 11]
    cli.fails("audit", "consistency", "5", "11", code="not_found")


def test_attest_verify_offline(cli: Cli, services: Services, tmp_path: Path) -> None:
    digest = request_digest("POST", "https://gw/tools/pay", "sha256:00")
    token = Attester(services.keyring, issuer=services.config.issuer).sign(
        decision_id="dec-1",
        agent_id="finance-agent",
        tool="payments",
        timestamp=services.clock.now(),
        policy_version="v1",
        decision="allow",
        request_digest=digest,
        jti="j-1",
    )
    jwks = tmp_path / "jwks.json"
    jwks.write_text(cli.run("jwks").stdout)
    out = cli.json("attest", "verify", token, "--jwks", str(jwks), "--request-digest", digest)
    assert out["claims"]["decision_id"] == "dec-1"
    cli.json("attest", "verify", token, "--jwks", str(jwks), "--issuer", services.config.issuer)
    cli.fails("attest", "verify", token, "--jwks", str(jwks), "--issuer", "https://evil",
              code="evidence_invalid")  # fmt: skip
    cli.fails("attest", "verify", token, "--jwks", str(jwks), "--request-digest", "sha256:ff",
              code="evidence_invalid")  # fmt: skip
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[::-1]}"
    line = cli.fails("attest", "verify", forged, "--jwks", str(jwks), code="evidence_invalid")
    assert "signature" in line or "malformed" in line
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    cli.fails("attest", "verify", token, "--jwks", str(empty), code="evidence_invalid")


def test_help_and_missing_arguments(cli: Cli) -> None:
    for group in (["audit"], ["attest"]):
        assert cli.run(*group, "--help").exit_code == 0
    result = cli.run("audit", "verify", "nope.jsonl")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1


def test_prove_names_the_decision_record_not_another_record_with_its_id(
    cli: Cli, log: AuditLog
) -> None:
    # A held call's approval.requested is written before its decision, with the same id.
    log.append("approval.requested", {"decision_id": "d-held", "id": "apr_1"})
    log.append("gateway.decision", {"decision_id": "d-held", "action": "approval_needed"})
    log.append("gateway.forward_failed", {"decision_id": "d-held", "code": "bad_gateway"})
    doc = cli.json("audit", "prove", "d-held")
    assert doc["seq"] == 2
    assert json.loads(doc["record"])["kind"] == "gateway.decision"


def test_prove_is_not_led_astray_by_a_callers_body(cli: Cli, log: AuditLog) -> None:
    """A body held for approval is written (redacted) in approval.requested before the decision:
    a member "kind": "gateway.decision" in it, or the decision's id named inside it, must not
    make that record the one proved. Only a record's own top-level members count."""
    log.append("approval.requested", {"id": "apr_1", "decision_id": "d-held",
                                      "parameters": {"kind": "gateway.decision", "amount": 5}})  # fmt: skip
    log.append("approval.requested", {"id": "apr_2", "decision_id": "d-other",
                                      "parameters": {"decision_id": "d-ghost"}})  # fmt: skip
    log.append("gateway.decision", {"decision_id": "d-held", "action": "approval_needed"})
    doc = cli.json("audit", "prove", "d-held")
    assert (doc["seq"], json.loads(doc["record"])["kind"]) == (3, "gateway.decision")
    cli.fails("audit", "prove", "d-ghost", code="not_found")
