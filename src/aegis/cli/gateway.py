"""``aegis gateway``: run the data plane, a reverse proxy deciding every call (docs/gateway.md).

The gateway reads the same ``aegis.yaml`` as the control plane (database, stores, keys) and its
``gateway:`` section (listen address, audience, routes, allow-list fallback, limits, and the
Envoy / nginx ext_authz doors under ``gateway.ext_authz``). It exits non-zero with a one-line
reason when the configuration is wrong or a port cannot be bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aegis.errors import AegisError

__all__ = ["app"]

app = typer.Typer(
    help="Run the Aegis gateway (reverse proxy with the decision pipeline).", no_args_is_help=True
)


@app.callback()
def gateway() -> None:
    """The data plane: every call decided, attested and audited (docs/gateway.md)."""


@app.command("run")
def run(
    host: Annotated[str | None, typer.Option(help="listen address (default: gateway.host)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default: gateway.port)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="aegis.yaml (default: $AEGIS_CONFIG)")
    ] = None,
    local_stores: Annotated[
        bool,
        typer.Option(
            "--local-stores",
            help="run with memory:// replay or revocation stores: this process's own, shared "
            "with no other (one gateway beside no other process; token revocations made "
            "elsewhere never reach it)",
        ),
    ] = False,
) -> None:
    """Serve the gateway (and the ext_authz doors configured) until interrupted."""
    from aegis.config import load_config
    from aegis.gateway.server import run_event_loop, serve_gateway
    from aegis.server.services import build_services

    try:
        cfg = load_config(config)
        if not cfg.gateway.routes:
            raise AegisError(
                "gateway.routes is empty; configure at least one route", code="config_invalid"
            )
        local = [name for name in ("replay", "revocation")
                 if getattr(cfg.stores, name).startswith("memory://")]  # fmt: skip
        if local and not local_stores:
            # A gateway process beside the control plane shares nothing kept in memory: a
            # token revoked there (/oauth/revoke) would still be accepted here.
            raise AegisError(
                f"stores.{' and stores.'.join(local)} {'is' if len(local) == 1 else 'are'} "
                "memory://, this process's own: token revocations made by the control plane or "
                "another gateway never reach it, and a proof spent at another gateway is not "
                "seen here. Point them at Redis (redis://host:port/db), or pass --local-stores "
                "to run with this process's own stores",
                code="config_invalid",
            )
        services = build_services(cfg)
    except AegisError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    try:
        run_event_loop(
            serve_gateway(
                services,
                cfg.gateway,
                host=host or cfg.gateway.host,
                port=port or cfg.gateway.port,
                log_level=cfg.logging.level,
            )
        )
    except (AegisError, OSError) as exc:
        typer.echo(f"error: {getattr(exc, 'message', None) or exc}", err=True)
        raise typer.Exit(2) from exc
