"""``aegis agents``: register, list and show agents, and move them through their life cycle.

``suspend``, ``quarantine`` and ``retire`` kill every token the agent holds at once (its
``tokens_not_before`` mark); a running server refuses them within its registry cache lifetime.
The CLI acts with the rights of whoever can open the database, so it may release a quarantine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from aegis.cli._common import JsonOpt, actor, emit, open_services, table
from aegis.cli.certs import agent_cert
from aegis.errors import InvalidRequest
from aegis.registry.service import AgentSpec
from aegis.server.admin_ops import STATUS_VERBS, agent_view, set_agent_status
from aegis.types import AgentStatus

__all__ = ["app"]

app = typer.Typer(help="Register agents and manage their life cycle.", no_args_is_help=True)

AgentId = Annotated[str, typer.Argument(help="The agent id (lowercase letters, digits, '-', '.').")]


def _jwk(value: str) -> list[dict[str, Any]]:
    """A public JWK or JWK Set given inline as JSON or as a file path."""
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise InvalidRequest(
                f"--jwk {value}: not inline JSON and not a readable file ({exc.strerror})",
                field="jwk",
            ) from None
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidRequest("--jwk: not valid JSON; give a public JWK", field="jwk") from None
    keys = data.get("keys") if isinstance(data, dict) and "keys" in data else [data]
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise InvalidRequest('--jwk: give a JWK object or a JWK Set {"keys": [...]}', field="jwk")
    return keys


def _show_agent(agent: dict[str, Any], console: Console) -> None:
    for name, value in agent.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        console.print(f"{name:<18} {'' if shown is None else shown}", markup=False)


@app.command()
def register(
    ctx: typer.Context,
    agent_id: AgentId,
    tenant: Annotated[str, typer.Option(help="Tenant id (created if new).")],
    env: Annotated[str, typer.Option(help="Environment, e.g. prod (created if new).")],
    owner: Annotated[str, typer.Option(help="E-mail of the accountable human.")],
    scope: Annotated[
        list[str] | None, typer.Option(help="A scope the agent may hold (repeatable).")
    ] = None,
    role: Annotated[list[str] | None, typer.Option(help="A role (repeatable).")] = None,
    display_name: Annotated[str, typer.Option(help="Human-readable name.")] = "",
    version: Annotated[str | None, typer.Option(help="Software version.")] = None,
    model: Annotated[str | None, typer.Option(help="Model the agent runs on.")] = None,
    jwk: Annotated[
        list[str] | None,
        typer.Option(help="Public JWK or JWK Set, inline JSON or a file (repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a new agent."""
    keys = [k for value in jwk or [] for k in _jwk(value)]
    spec = AgentSpec(
        id=agent_id,
        tenant_id=tenant,
        env=env,
        owner=owner,
        display_name=display_name,
        roles=tuple(role or ()),
        allowed_scopes=tuple(scope or ()),
        software_version=version,
        model=model,
        jwks=tuple(keys),
    )
    with open_services(ctx) as services:
        view = agent_view(services.registry.register_agent(spec, actor=actor()))
    emit(view, as_json, lambda c: c.print(f"registered agent {agent_id} ({tenant}/{env})"))


@app.command("list")
def list_agents(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    env: Annotated[str | None, typer.Option(help="Only this environment.")] = None,
    status: Annotated[AgentStatus | None, typer.Option(help="Only this status.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List agents."""
    with open_services(ctx) as services:
        agents = services.registry_store.list_agents(tenant_id=tenant, env=env, status=status)
    views = [agent_view(a) for a in agents]
    rows = [
        [a["id"], a["tenant"], a["env"], a["status"], a["owner"], " ".join(a["scopes"])]
        for a in views
    ]
    emit(
        {"items": views},
        as_json,
        lambda c: c.print(table(["id", "tenant", "env", "status", "owner", "scopes"], rows)),
    )


@app.command()
def show(ctx: typer.Context, agent_id: AgentId, as_json: JsonOpt = False) -> None:
    """Show one agent."""
    with open_services(ctx) as services:
        view = agent_view(services.registry_store.get_agent(agent_id))
    emit(view, as_json, lambda c: _show_agent(view, c))


def _status_command(status: AgentStatus, help_text: str) -> None:
    def change(
        ctx: typer.Context,
        agent_id: AgentId,
        reason: Annotated[str, typer.Option(help="Why (recorded in the event log).")],
        as_json: JsonOpt = False,
    ) -> None:
        if not reason.strip():
            raise InvalidRequest("--reason must not be empty", field="reason")
        with open_services(ctx) as services:
            agent = set_agent_status(
                services,
                agent_id,
                status,
                reason=reason,
                actor=actor(),
                may_release_quarantine=True,
            )
        emit(agent_view(agent), as_json, lambda c: c.print(f"agent {agent_id} is {status.value}"))

    change.__doc__ = help_text
    app.command(STATUS_VERBS[status])(change)


_status_command(AgentStatus.SUSPENDED, "Suspend an agent: its tokens stop working at once.")
_status_command(AgentStatus.QUARANTINED, "Quarantine an agent under investigation.")
_status_command(AgentStatus.RETIRED, "Retire an agent for good (cannot be undone).")
_status_command(AgentStatus.ACTIVE, "Activate a suspended or quarantined agent again.")


# An agent's own certificate: enrol, and with --watch renew at 2/3 of the lifetime (docs/pki.md).
app.command("cert")(agent_cert)
