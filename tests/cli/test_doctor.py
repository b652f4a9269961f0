"""``aegis doctor``: the token lifetime warning and the high-risk-tool delegation check."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aegis.cli.doctor import app, check_config, check_high_risk_rules, rule_views
from aegis.config import load_config
from aegis.policy.loader import load_document
from aegis.policy.store import SqlPolicyStore
from aegis.registry.service import AgentSpec
from aegis.server.services import build_services


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


def test_host_less_routes_a_host_of_its_own_does_not_serve_warn(tmp_path: Path) -> None:
    routes = """gateway:
  routes:
    - {path_prefix: /payments, upstream: "http://u", tool: p, tenant: t, env: e}
    - {path_prefix: /status, upstream: "http://u", tool: s, tenant: t, env: e}
    - {path_prefix: /status, host: Admin.Example.com, upstream: "http://u", tool: s, tenant: t,
       env: e}
    - {path_prefix: /, host: all.example.com, upstream: "http://u", tool: a, tenant: t, env: e}
"""
    [finding] = check_config(load_config(_config(tmp_path, routes), environ={}))
    assert (finding.level, finding.check) == ("warn", "host_routes")
    assert "admin.example.com" in finding.message and "/payments" in finding.message
    assert "/status" not in finding.message


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


POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: payments}
spec:
  rules:
    - id: open-transfer
      action: allow
      match: {tools: [payments.transfer]}
    - id: transfer-via-finance
      action: allow
      match: {tools: [payments.transfer], chain: {parents: [finance]}}
    - id: refund-for-a-user
      action: approval_needed
      match: {tools: [payments.refund], chain: {origin_users: [alice@example.com]}}
      approval: {group: finance}
    - id: no-drops
      action: deny
      match: {tools: [db.drop_table]}
    - id: trial-drop
      action: allow
      shadow: true
      match: {tools: [db.drop_table]}
    - id: read-docs
      action: allow
      match: {tools: [docs.read]}
"""
SAFE = POLICY.replace(
    "id: open-transfer\n      action: allow", "id: open-transfer\n      action: deny"
)
RISKY = "delegation:\n  high_risk_tools: ['payments.*', 'db.*']\n"


def test_policy_rules_are_read_from_documents() -> None:
    views = {v.id: v for v in rule_views(load_document(POLICY))}
    open_transfer = views["payments/open-transfer"]
    assert (open_transfer.allows, open_transfer.requires_parent) == (True, False)
    assert views["payments/transfer-via-finance"].requires_parent
    assert views["payments/refund-for-a-user"].requires_parent
    assert not views["payments/no-drops"].allows
    assert not views["payments/trial-drop"].allows  # shadow rules never let a call through
    shadow = load_document(POLICY.replace("spec:\n", "spec:\n  mode: shadow\n"))
    [only] = rule_views(shadow)
    assert (only.tools, only.allows, only.requires_parent) == (("*",), True, False)


def test_a_policy_file_leaving_parent_optional_for_a_high_risk_tool_is_flagged(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    config = str(_config(tmp_path, RISKY))
    risky, safe = tmp_path / "risky.yaml", tmp_path / "safe.yaml"
    risky.write_text(POLICY)
    safe.write_text(SAFE)
    flagged = runner.invoke(app, ["--config", config, "--policy", str(risky)])
    assert flagged.exit_code == 1, flagged.output
    [line] = [ln for ln in flagged.output.splitlines() if "high_risk_without_parent" in ln]
    assert "payments/open-transfer" in line and "payments.*" in line
    ok = runner.invoke(app, ["--config", config, "--policy", str(safe)])
    assert (ok.exit_code, ok.output.strip()) == (0, "ok: no findings")
    as_json = runner.invoke(app, ["--config", config, "--policy", str(risky), "--json"])
    assert as_json.exit_code == 1
    [finding] = json.loads(as_json.stdout)["findings"]
    assert (finding["check"], finding["subject"]) == (
        "high_risk_without_parent",
        "payments/open-transfer",
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: aegis/v1\nkind: Policy\n")
    bad = runner.invoke(app, ["--config", config, "--policy", str(broken)])
    assert bad.exit_code == 1
    assert "broken.yaml" in bad.stderr


def test_the_active_policies_in_the_database_are_checked(tmp_path: Path) -> None:
    path = _config(tmp_path, RISKY)
    cfg = load_config(path, environ={})
    services = build_services(cfg)
    services.registry.register_agent(
        AgentSpec("payer", "acme", "prod", "owner@example.com"), actor="test"
    )
    store = SqlPolicyStore(cfg.database_url())
    store.activate("acme", "prod", store.put(load_document(POLICY), now=1), actor="t", now=1)
    runner = CliRunner()
    flagged = runner.invoke(app, ["--config", str(path)])
    assert flagged.exit_code == 1, flagged.output
    assert "payments/open-transfer" in flagged.output
    store.activate("acme", "prod", store.put(load_document(SAFE), now=2), actor="t", now=2)
    ok = runner.invoke(app, ["--config", str(path)])
    assert (ok.exit_code, ok.output.strip()) == (0, "ok: no findings")
    store.close()
    asyncio.run(services.aclose())


def test_doctor_checks_something_or_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where there is no aegis.yaml, doctor checked the defaults and an empty database it
    created there, and answered ``ok: no findings``: a CI gate that checked nothing passed. A
    ``--policy`` file was never read unless high-risk tools were configured, so a missing or
    broken one passed too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AEGIS_CONFIG", raising=False)
    monkeypatch.delenv("AEGIS_DATABASE__URL", raising=False)
    runner = CliRunner()
    nowhere = runner.invoke(app, ["--high-risk-tool", "payments.*"])
    assert nowhere.exit_code == 1 and "aegis.yaml does not exist" in nowhere.output
    assert list(tmp_path.iterdir()) == []
    config = _config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: aegis/v1\nkind: [this is not a policy\n")
    for given in (tmp_path / "missing.yaml", broken):
        result = runner.invoke(app, ["--config", str(config), "--policy", str(given)])
        assert result.exit_code == 1 and result.output.startswith("error: policy_invalid"), (
            given,
            result.output,
        )
    good = tmp_path / "good.yaml"
    good.write_text("apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n"
                    "    - {id: a, action: allow, match: {tools: [read]}}\n")  # fmt: skip
    fine = runner.invoke(app, ["--config", str(config), "--policy", str(good)])
    assert (fine.exit_code, fine.output) == (0, "ok: no findings\n")


def test_mcp_routes_an_ext_authz_door_cannot_serve_whole_warn(tmp_path: Path) -> None:
    route = ('  routes:\n    - {path_prefix: /mcp, upstream: "http://u", tool: repo, tenant: t, '
             "env: e, mcp: true}\n")  # fmt: skip
    fine = f"gateway:\n{route}  ext_authz: {{grpc_port: 9901, envoy_buffers_body: true}}\n"
    assert check_config(load_config(_config(tmp_path, fine), environ={})) == []
    doors = f"gateway:\n{route}  ext_authz: {{grpc_port: 9901, http_port: 9902}}\n"
    [finding] = check_config(load_config(_config(tmp_path, doors), environ={}))
    assert (finding.level, finding.check, finding.subject) == (
        "warn", "mcp_routes", "gateway.ext_authz"
    )  # fmt: skip
    assert "HTTP ext_authz door and the gRPC" in finding.message and "/mcp" in finding.message
    short = f"gateway:\n{route}  mcp_session_idle: 900\n"
    [finding] = check_config(load_config(_config(tmp_path, short), environ={}))
    assert (finding.check, finding.subject) == ("mcp_routes", "gateway.mcp_session_idle")
    # Without an MCP route, neither is a concern.
    plain = "gateway:\n  mcp_session_idle: 900\n  ext_authz: {http_port: 9902}\n"
    assert check_config(load_config(_config(tmp_path, plain), environ={})) == []


def test_a_tenant_trusting_two_user_token_issuers_warns(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')

    def trusts(*pairs: tuple[str, str]) -> str:
        entries = "".join(f"    - {{issuer: '{iss}', tenant: {tenant}, jwks_file: jwks.json}}\n"
                          for iss, tenant in pairs)  # fmt: skip
        return "delegation:\n  external_issuers:\n" + entries

    apart = trusts(("https://idp.acme", "acme"), ("https://idp.globex", "globex"))
    assert check_config(load_config(_config(tmp_path, apart), environ={})) == []
    shared = trusts(("https://idp.acme", "acme"), ("https://partner.example", "acme"))
    [finding] = check_config(load_config(_config(tmp_path, shared), environ={}))
    assert (finding.level, finding.check, finding.subject) == (
        "warn", "origin_issuers", "delegation.external_issuers"
    )  # fmt: skip
    assert "chain.origin_iss" in finding.message and "https://partner.example" in finding.message
