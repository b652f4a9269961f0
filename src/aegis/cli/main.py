"""``aegis``: the root command. Mounts every verb group and owns the global ``--config``.

The console script ``aegis = aegis.cli.main:main`` runs :data:`app`. ``--config PATH`` (or
``$AEGIS_CONFIG``, else ``./aegis.yaml``) applies to every command: the groups written here read
it from the root context, and groups that take their own ``--config`` get it as their default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click.core import Command  # typer vendors click since 0.26
from typer.core import TyperGroup

from aegis.cli import (
    agents,
    approvals,
    attest,
    audit,
    ca,
    clients,
    demo,
    doctor,
    gateway,
    init,
    keys,
    token,
    up,
)
from aegis.cli._common import CliState, RootGroup

__all__ = ["app", "main"]

app = typer.Typer(
    cls=RootGroup,
    help="Aegis: identity, policy and audit for multi-agent AI systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _config_defaults(command: Command, path: str) -> dict[str, Any]:
    """A click ``default_map`` giving ``path`` to every subcommand with a ``config`` parameter."""
    out: dict[str, Any] = {}
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            nested = _config_defaults(sub, path)
            if nested:
                out[name] = nested
    elif any(p.name == "config" for p in command.params):
        out["config"] = path
    return out


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="aegis.yaml to use (default: $AEGIS_CONFIG or ./aegis.yaml)."
        ),
    ] = None,
) -> None:
    """Aegis: identity, policy and audit for multi-agent AI systems."""
    ctx.obj = CliState(config)
    if config is not None:
        ctx.default_map = _config_defaults(ctx.command, str(config))


app.command("init")(init.init)
app.command("up")(up.up)
app.command("demo")(demo.demo)
app.add_typer(agents.app, name="agents")
app.add_typer(clients.app, name="clients")
app.add_typer(token.app, name="token")
app.add_typer(keys.app, name="keys")
app.command("jwks")(keys.jwks)
app.add_typer(ca.app, name="ca")
app.add_typer(gateway.app, name="gateway")
app.add_typer(approvals.app, name="approvals")
app.command("doctor")(doctor.doctor)
app.add_typer(audit.app, name="audit")
app.add_typer(attest.app, name="attest")
# `aegis policy` is optional: mounted when its module is present. An import error inside it is a
# bug and stays loud.
if importlib.util.find_spec("aegis.cli.policy") is not None:
    from aegis.cli import policy

    app.add_typer(policy.app, name="policy")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
