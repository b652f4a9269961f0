"""``aegis token mint``: an access token for an agent, for scripts and tests.

The token is issued exactly as the token endpoint would issue it to the agent's first active
client that needs no proof of possession (same scope narrowing, audience and lifetime caps), and
the minting is recorded as an event. Without ``--json`` only the token is printed, so
``TOKEN=$(aegis token mint my-agent)`` works.
"""

from __future__ import annotations

from typing import Annotated

import typer

from aegis.cli._common import JsonOpt, actor, emit, open_services
from aegis.server.admin_ops import mint_token

__all__ = ["app"]

app = typer.Typer(help="Mint access tokens for agents.", no_args_is_help=True)


@app.callback()
def token() -> None:
    """Access tokens for scripts and tests."""


@app.command()
def mint(
    ctx: typer.Context,
    agent_id: Annotated[str, typer.Argument(help="The agent the token is for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(help="A scope to ask for (repeatable; default: all the agent may hold)."),
    ] = None,
    audience: Annotated[
        list[str] | None, typer.Option(help="An audience (repeatable; default: the first).")
    ] = None,
    lifetime: Annotated[
        int | None, typer.Option(min=1, help="Seconds (capped at tokens.max_lifetime).")
    ] = None,
    client: Annotated[
        str | None, typer.Option(help="Use this client instead of the first active one.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Mint an access token for an agent."""
    with open_services(ctx) as services:
        issued = mint_token(
            services,
            agent_id,
            actor=actor(),
            client_id=client,
            scopes=tuple(scope or ()),
            audiences=tuple(audience or ()),
            lifetime=lifetime,
        )
    emit(issued, as_json, lambda c: c.print(issued["access_token"], markup=False, highlight=False))
