"""The ``aegis`` CLI through typer's runner: init, agents, clients, token, keys, jwks and failures.

Every command runs against a real SQLite setup made by ``aegis init`` in a temporary directory.
JSON outputs must parse as the one document on stdout; failures are one line on stderr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer._click.core import Command
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner, Result

from aegis.cli import template
from aegis.cli.main import app
from aegis.config import AegisConfig, load_config
from aegis.errors import ClientAuthError
from aegis.server.services import build_services

REGISTER = [
    "agents",
    "register",
    "finance-agent",
    "--tenant",
    "acme",
    "--env",
    "prod",
    "--owner",
    "alice@example.com",
    "--scope",
    "payments:write",
    "--scope",
    "payments:read",
]


class Cli:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = directory / "aegis.yaml"
        self.runner = CliRunner()
        #: What ``aegis init --json`` printed.
        self.init: dict[str, Any] = {}

    def run(self, *args: str) -> Result:
        return self.runner.invoke(app, ["--config", str(self.config), *args])

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output
        assert result.stderr == ""
        return json.loads(result.stdout)

    def fails(self, *args: str, code: str, exit_code: int = 1) -> str:
        result = self.run(*args)
        assert result.exit_code == exit_code, result.output
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {code}"), lines[0]
        assert "Traceback" not in result.output
        return lines[0]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    c.init = c.json("init", "--dir", str(tmp_path))
    return c


def test_init_writes_a_private_commented_setup(cli: Cli) -> None:
    made = cli.init
    data = cli.directory / ".aegis"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("kek", "pepper", "admin.key", "aegis.db"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    for name in ("kek", "pepper"):
        assert len(base64.b64decode((data / name).read_text().strip(), validate=True)) == 32
    assert (data / "kek").read_text() != (data / "pepper").read_text()
    assert (data / "admin.key").read_text().strip() == made["admin_key"]
    config = load_config(cli.config, environ={})
    assert config == AegisConfig(base_dir=str(cli.directory))  # every default, nothing else
    services = build_services(config)
    try:
        assert services.registry.authenticate_admin(made["admin_key"]).role.value == "admin"
        assert {r.state.value for r in services.keyring.records()} == {"active", "next"}
    finally:
        asyncio.run(services.aclose())
    assert "kek:" in cli.config.read_text() and made["admin_key"] not in cli.config.read_text()


def test_init_refuses_to_overwrite_without_force(cli: Cli) -> None:
    old = cli.init
    line = cli.fails("init", "--dir", str(cli.directory), code="conflict")
    assert "--force" in line
    assert (cli.directory / ".aegis" / "admin.key").read_text().strip() == old["admin_key"]
    new = cli.json("init", "--dir", str(cli.directory), "--force")
    assert new["admin_key"] != old["admin_key"]
    services = build_services(load_config(cli.config, environ={}))
    try:
        with pytest.raises(ClientAuthError):
            services.registry.authenticate_admin(old["admin_key"])
        assert services.registry_store.list_agents() == []
    finally:
        asyncio.run(services.aclose())


def test_template_comments_every_setting() -> None:
    def paths(data: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for name, value in data.items():
            out.add(prefix + name)
            if isinstance(value, dict) and value:
                out |= paths(value, f"{prefix}{name}.")
        return out

    settings = paths(AegisConfig().model_dump(mode="json")) - {"base_dir"}
    assert settings - set(template.COMMENTS) == set(), "add a one-line comment for each"
    assert set(template.COMMENTS) - settings == set(), "a commented setting no longer exists"
    rendered = yaml.safe_load(template.render_config())
    assert paths(rendered) == settings


def test_agents_commands(cli: Cli) -> None:
    agent = cli.json(*REGISTER, "--role", "payer", "--model", "m-1", "--version", "1.2")
    assert agent["scopes"] == ["payments:write", "payments:read"]
    assert (agent["status"], agent["roles"], agent["model"]) == ("active", ["payer"], "m-1")
    cli.fails(*REGISTER, code="conflict")
    assert [a["id"] for a in cli.json("agents", "list", "--tenant", "acme")["items"]] == [
        "finance-agent"
    ]
    assert cli.json("agents", "list", "--status", "suspended")["items"] == []
    assert cli.json("agents", "show", "finance-agent")["owner"] == "alice@example.com"
    human = cli.run("agents", "list")
    assert human.exit_code == 0 and "finance-agent" in human.stdout
    for verb, status in [
        ("suspend", "suspended"),
        ("activate", "active"),
        ("quarantine", "quarantined"),
        ("activate", "active"),
        ("retire", "retired"),
    ]:
        changed = cli.json("agents", verb, "finance-agent", "--reason", f"test {verb}")
        assert changed["status"] == status
    cli.fails("agents", "activate", "finance-agent", "--reason", "again", code="conflict")
    cli.fails("agents", "show", "nobody", code="not_found")
    cli.fails("agents", "register", "Bad_Id", "--tenant", "a", "--env", "b", "--owner", "a@b.c",
              code="invalid_request")  # fmt: skip
    cli.fails(*REGISTER[:-4], "--owner", "nobody", code="invalid_request")


def test_agent_public_key_from_file_or_inline(cli: Cli, tmp_path: Path) -> None:
    from aegis.crypto.keys import Ed25519SigningKey

    public = Ed25519SigningKey.generate().public.to_jwk()
    (tmp_path / "key.json").write_text(json.dumps({"keys": [public]}))
    agent = cli.json(*REGISTER, "--jwk", str(tmp_path / "key.json"))
    assert agent["jwks"][0]["x"] == public["x"]
    client = cli.json("clients", "create", "finance-agent", "--method", "private_key_jwt")
    assert client["client_secret"] is None and client["auth_method"] == "private_key_jwt"
    other = cli.json("agents", "register", "b", "--tenant", "acme", "--env", "prod", "--owner",
                     "bob@example.com", "--jwk", json.dumps(public))  # fmt: skip
    assert other["jwks"][0]["x"] == public["x"]
    cli.fails(*REGISTER[:3], "--tenant", "a", "--env", "b", "--owner", "a@b.c", "--jwk",
              str(tmp_path / "missing.json"), code="invalid_request")  # fmt: skip


def test_clients_and_token_commands(cli: Cli) -> None:
    cli.json(*REGISTER)
    cli.fails("token", "mint", "finance-agent", code="conflict")
    created = cli.json("clients", "create", "finance-agent")
    assert created["client_id"].startswith("finance-agent.")
    assert created["client_secret"].startswith("aegis_cs_")
    listed = cli.run("clients", "list", "finance-agent", "--json")
    assert created["client_secret"] not in listed.stdout
    assert [c["client_id"] for c in json.loads(listed.stdout)["items"]] == [created["client_id"]]
    rotated = cli.json("clients", "rotate-secret", created["client_id"])
    assert rotated["client_secret"] not in (None, created["client_secret"])
    assert len(rotated["secrets"]) == 2  # the previous one for the overlap
    cut = cli.json("clients", "rotate-secret", created["client_id"], "--revoke-previous")
    assert cut["client_secret"] not in (None, rotated["client_secret"])
    assert len(cut["secrets"]) == 1
    human = cli.run("clients", "create", "finance-agent", "--dpop-bound")
    assert human.exit_code == 0 and "client_secret aegis_cs_" in human.stdout

    minted = cli.json("token", "mint", "finance-agent", "--scope", "payments:read")
    assert minted["scope"] == "payments:read"
    assert minted["client_id"] == created["client_id"]  # the DPoP-bound client is never picked
    plain = cli.run("token", "mint", "finance-agent", "--lifetime", "60")
    assert plain.exit_code == 0 and plain.stdout.count(".") == 2  # only the compact JWS
    services = build_services(load_config(cli.config, environ={}))
    try:
        claims = services.verifier.verify(plain.stdout.strip()).claims
        assert claims["sub"] == "finance-agent" and claims["exp"] - claims["iat"] == 60
        events = services.registry_store.list_events(limit=1000)
        assert sum(e.type == "token.minted" for e in events) == 2
        assert all(e.actor.startswith("cli:") for e in events if e.type == "token.minted")
    finally:
        asyncio.run(services.aclose())
    cli.fails("token", "mint", "finance-agent", "--scope", "admin:all", code="invalid_scope")
    assert cli.json("clients", "disable", created["client_id"])["active"] is False
    cli.fails("token", "mint", "finance-agent", code="conflict")
    assert cli.json("clients", "enable", created["client_id"])["active"] is True
    cli.fails("clients", "create", "nobody", code="not_found")


def test_keys_and_jwks_commands(cli: Cli) -> None:
    keys = cli.json("keys", "list")["items"]
    assert {k["state"] for k in keys} == {"active", "next"}
    assert all(set(k) == {"kid", "alg", "state", "created_at", "activated_at", "retired_at",
                          "remove_after"} for k in keys)  # fmt: skip
    cli.fails("keys", "rotate", code="conflict")
    next_kid = next(k["kid"] for k in keys if k["state"] == "next")
    assert cli.json("keys", "rotate", "--force")["active"] == next_kid
    jwks = cli.json("jwks")
    assert next_kid in {k["kid"] for k in jwks["keys"]}
    assert all(set(k) == {"kty", "crv", "x", "kid", "use", "alg"} for k in jwks["keys"])


def test_failures_are_one_line_without_traceback(tmp_path: Path) -> None:
    c = Cli(tmp_path)  # nothing initialised here
    line = c.fails("agents", "list", code="config_invalid")
    assert "aegis init" in line
    assert not (tmp_path / ".aegis").exists()  # no stray database was created
    c.fails("agents", "register", code="Missing argument", exit_code=2)
    c.fails("agents", "nonsense", code="No such command", exit_code=2)
    (tmp_path / "aegis.yaml").write_text("tokens:\n  default_lifetim: 5\n")
    c.fails("agents", "list", code="config_invalid")


def test_global_config_reaches_groups_with_their_own_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--config", str(tmp_path / "none.yaml"), "doctor"])
    assert result.exit_code == 1
    assert "none.yaml does not exist" in result.stderr


def _commands(command: Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_command_has_help() -> None:
    commands = list(_commands(get_command(app)))
    names = {" ".join(c) for c in commands}
    for expected in ("init", "up", "agents register", "agents quarantine", "clients create",
                     "clients rotate-secret", "clients list", "token mint", "keys list",
                     "keys rotate", "jwks"):  # fmt: skip
        assert expected in names
    runner = CliRunner()
    theirs = ("ca", "gateway", "doctor", "policy")  # other groups test their own help
    for command in [c for c in commands if not c or c[0] not in theirs]:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.stdout
        leaf = not _is_group(command)
        if command and leaf:
            assert "--json" in result.stdout, command


def _is_group(path: tuple[str, ...]) -> bool:
    command: Command = get_command(app)
    for name in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    return isinstance(command, TyperGroup)
