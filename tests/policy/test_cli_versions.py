"""``aegis policy store|activate|versions`` against a real ``aegis init`` setup (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aegis.cli.init import initialise
from aegis.cli.main import app
from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.policy import PolicyWatcher, SqlPolicyStore, load_file, policy_version
from aegis.policy.input import build_input, call_from_dict
from aegis.stores import open_registry_store
from tests.policy.conftest import REPO

PAYMENTS = REPO / "examples" / "policies" / "payments.yaml"
LARGE = {
    "tool": "payments.transfer",
    "scopes": ["payments:write"],
    "body": {"amount": 9000, "account": "GB1234567890"},
    "time": 1736935200,
}


class Cli:
    def __init__(self, directory: Path) -> None:
        initialise(directory)
        self.config = directory / "aegis.yaml"
        self.runner = CliRunner()

    def run(self, *args: str) -> Result:
        return self.runner.invoke(app, ["--config", str(self.config), "policy", *args])

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def events(self) -> list[Any]:
        store = open_registry_store(load_config(self.config, environ={}).database_url())
        try:
            return [e for e in store.list_events(limit=10_000) if e.type.startswith("policy.")]
        finally:
            store.close()  # type: ignore[attr-defined]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.mark.parametrize("command", ["store", "activate", "versions"])
def test_help_and_json(command: str) -> None:
    result = CliRunner().invoke(app, ["policy", command, "--help"])
    assert result.exit_code == 0 and "--json" in result.stdout


def test_store_activate_and_list(cli: Cli) -> None:
    version = policy_version(load_file(PAYMENTS))
    assert cli.json("versions")["items"] == []
    stored = cli.json("store", str(PAYMENTS))
    assert stored == {"version": version}
    assert cli.json("versions", "--tenant", "acme", "--env", "prod")["active"] is None
    active = cli.json("activate", version, "--tenant", "acme", "--env", "prod")
    assert (active["tenant"], active["env"], active["version"]) == ("acme", "prod", version)
    listed = cli.json("versions", "--tenant", "acme", "--env", "prod")
    assert [v["version"] for v in listed["items"]] == [version]
    assert listed["active"]["version"] == version
    human = cli.run("versions", "--tenant", "acme", "--env", "prod")
    assert human.exit_code == 0 and "payments" in human.stdout
    types = [e.type for e in cli.events()]
    assert types.count("policy.stored") == 1 and types.count("policy.activated") == 1
    assert all(e.actor.startswith("cli:") for e in cli.events())
    # What the CLI activated is what a gateway watching the database enforces.
    store = SqlPolicyStore(load_config(cli.config, environ={}).database_url())
    try:
        watcher = PolicyWatcher(store, tenant="acme", env="prod", clock=FrozenClock(0))
        decision = watcher.evaluate(build_input(call_from_dict(LARGE)))
        assert (decision.action, decision.policy_version) == ("approval_needed", version)
    finally:
        store.close()


def test_store_with_a_scope_activates_at_once(cli: Cli) -> None:
    out = cli.json("store", str(PAYMENTS), "--tenant", "acme", "--env", "dev")
    assert out["activation"]["version"] == out["version"]
    assert cli.json("versions", "--tenant", "acme", "--env", "dev")["active"]["env"] == "dev"


def test_refusals_change_nothing(cli: Cli, tmp_path: Path) -> None:
    version = cli.json("store", str(PAYMENTS), "--tenant", "acme", "--env", "prod")["version"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(PAYMENTS.read_text().replace("action: allow", "action: alow", 1))
    refused = cli.run("store", str(bad), "--tenant", "acme", "--env", "prod")
    assert refused.exit_code == 1
    assert f"{bad}:" in refused.stderr and refused.stderr.count("\n") == 1
    as_json = json.loads(cli.run("store", str(bad), "--json").stdout)
    assert as_json["error"]["code"] == "policy_invalid"
    unknown = cli.run("activate", "sha256:" + "0" * 64, "--tenant", "acme", "--env", "prod")
    assert unknown.exit_code == 1 and "error:" in unknown.stderr
    missing = cli.run("store", str(tmp_path / "none.yaml"))
    assert missing.exit_code == 2
    half = cli.run("store", str(PAYMENTS), "--tenant", "acme")
    assert half.exit_code != 0
    listed = cli.json("versions", "--tenant", "acme", "--env", "prod")
    assert [v["version"] for v in listed["items"]] == [version]
    assert listed["active"]["version"] == version
    assert [e.type for e in cli.events()].count("policy.rejected") == 2


def test_without_a_setup_it_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--config", str(tmp_path / "aegis.yaml"), "policy", "versions"]
    )
    assert result.exit_code == 1 and "aegis init" in result.stderr
