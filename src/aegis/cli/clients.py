"""``aegis clients``: OAuth clients of an agent (RFC 6749 §2), their secrets and their state.

A client secret is printed once, when it is created or rotated; only its keyed hash is stored.
After a rotation the previous secret keeps working for ``secrets.rotation_overlap`` seconds.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from aegis.cli._common import JsonOpt, actor, emit, open_services, table
from aegis.server.admin_ops import client_view
from aegis.types import ClientAuthMethod

__all__ = ["app"]

app = typer.Typer(
    help="Create OAuth clients for agents and rotate their secrets.", no_args_is_help=True
)

ClientId = Annotated[str, typer.Argument(help="The client id.")]


def _show_secret(view: dict[str, Any], console: Console) -> None:
    console.print(f"client_id     {view['client_id']}", markup=False, highlight=False)
    if view.get("client_secret"):
        console.print(f"client_secret {view['client_secret']}", markup=False, highlight=False)
        console.print("the secret is shown only now: store it in your secret manager")


@app.command()
def create(
    ctx: typer.Context,
    agent_id: Annotated[str, typer.Argument(help="The agent the client acts for.")],
    method: Annotated[
        ClientAuthMethod,
        typer.Option(help="How the client authenticates at the token endpoint."),
    ] = ClientAuthMethod.CLIENT_SECRET_BASIC,
    dpop_bound: Annotated[
        bool, typer.Option("--dpop-bound", help="Issue only DPoP-bound tokens (RFC 9449).")
    ] = False,
    tls_san_uri: Annotated[
        str | None, typer.Option(help="For tls_client_auth: the certificate's SAN URI.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a client; prints client_id and, for secret methods, the one-time client_secret."""
    with open_services(ctx) as services:
        client, secret = services.registry.create_client(
            agent_id,
            auth_method=method,
            dpop_bound=dpop_bound,
            tls_san_uri=tls_san_uri,
            actor=actor(),
        )
    view = {**client_view(client), "client_secret": secret}
    emit(view, as_json, lambda c: _show_secret(view, c))


@app.command("rotate-secret")
def rotate_secret(
    ctx: typer.Context,
    client_id: ClientId,
    revoke_previous: Annotated[
        bool,
        typer.Option(
            "--revoke-previous",
            help="The previous secret stops now (a leak), not after secrets.rotation_overlap.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a new secret (printed once); the previous one works for the overlap window, unless
    --revoke-previous or the client is disabled (the answer to a leak): then it stops now."""
    with open_services(ctx) as services:
        client, secret = services.registry.rotate_secret(
            client_id, actor=actor(), revoke_previous=revoke_previous
        )
    view = {**client_view(client), "client_secret": secret}
    emit(view, as_json, lambda c: _show_secret(view, c))


@app.command("list")
def list_clients(
    ctx: typer.Context,
    agent_id: Annotated[str, typer.Argument(help="The agent whose clients to list.")],
    as_json: JsonOpt = False,
) -> None:
    """List an agent's clients (never their secrets)."""
    with open_services(ctx) as services:
        services.registry_store.get_agent(agent_id)  # unknown agent: not_found
        views = [client_view(c) for c in services.registry_store.list_clients(agent_id)]
    rows = [
        [v["client_id"], v["auth_method"], "yes" if v["active"] else "no", v["dpop_bound"]]
        for v in views
    ]
    emit(
        {"items": views},
        as_json,
        lambda c: c.print(table(["client_id", "method", "active", "dpop_bound"], rows)),
    )


def _active_command(name: str, active: bool, help_text: str) -> None:
    def change(ctx: typer.Context, client_id: ClientId, as_json: JsonOpt = False) -> None:
        with open_services(ctx) as services:
            client = services.registry.set_client_active(client_id, active, actor=actor())
        emit(client_view(client), as_json, lambda c: c.print(f"client {client_id} {name}d"))

    change.__doc__ = help_text
    app.command(name)(change)


_active_command("disable", False, "Disable a client: its tokens stop working at once.")
_active_command("enable", True, "Enable a disabled client again.")
