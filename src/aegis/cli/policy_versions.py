"""``aegis policy store|activate|versions``: policy versions in the configured database.

The same operations as ``/v1/policy/versions`` and ``/v1/policy/activations``, for the directory
where ``aegis init`` ran (or ``--config``): a document is validated before it is stored (a rejected
one changes nothing), an activation names a stored version, and every change is an event in the
registry's event log with actor ``cli:<user>``. Running gateways pick an activation up on their
next poll. Exit status 1 on a refused document or an unknown version, 2 on unreadable input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from aegis.cli._common import actor, load
from aegis.clock import SystemClock
from aegis.policy.service import PolicyService, registry_event_hook
from aegis.policy.store import Activation, SqlPolicyStore
from aegis.policy.version import short_version
from aegis.stores import open_registry_store

__all__ = ["activate", "store", "versions"]

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document")]
Tenant = Annotated[str, typer.Option("--tenant", help="tenant the version becomes active for")]
Env = Annotated[str, typer.Option("--env", help="environment the version becomes active for")]


@contextmanager
def _service(ctx: typer.Context) -> Iterator[tuple[PolicyService, SqlPolicyStore]]:
    url = load(ctx).database_url()
    registry = open_registry_store(url)
    store = SqlPolicyStore(url)
    try:
        yield PolicyService(store, clock=SystemClock(), emit=registry_event_hook(registry)), store
    finally:
        store.close()
        close = getattr(registry, "close", None)
        if close is not None:
            close()


def _activation(a: Activation) -> dict[str, Any]:
    return {"tenant": a.tenant, "env": a.env, "version": a.version, "activated_at": a.activated_at}


def store(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="policy document (YAML or JSON)")],
    tenant: Annotated[str | None, typer.Option(help="also activate it for this tenant")] = None,
    env: Annotated[str | None, typer.Option(help="and this environment")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate and store a policy version; with --tenant and --env, activate it too."""
    from aegis.cli.policy import _emit, _failures

    with _failures(as_json):
        if (tenant is None) != (env is None):
            raise typer.BadParameter("give both --tenant and --env, or neither")
        text = file.read_bytes()
        with _service(ctx) as (service, _):
            version = service.store(text, file=str(file), actor=actor())
            out: dict[str, Any] = {"version": version}
            if tenant is not None and env is not None:
                out["activation"] = _activation(
                    service.activate(tenant, env, version, actor=actor())
                )
        where = f"; active for {tenant}/{env}" if tenant else ""
        _emit(out, as_json, f"stored {short_version(version)}{where}")


def activate(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="a stored version (sha256:...)")],
    tenant: Tenant,
    env: Env,
    as_json: JsonOpt = False,
) -> None:
    """Make a stored policy version the active one for a tenant and environment."""
    from aegis.cli.policy import _emit, _failures

    with _failures(as_json), _service(ctx) as (service, _):
        done = service.activate(tenant, env, version, actor=actor())
        _emit(_activation(done), as_json, f"{short_version(version)} active for {tenant}/{env}")


def versions(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option(help="show what is active for this tenant")] = None,
    env: Annotated[str | None, typer.Option(help="and this environment")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List stored policy versions, and the active one for --tenant/--env."""
    from aegis.cli.policy import _emit, _failures

    with _failures(as_json), _service(ctx) as (_, policies):
        stored = policies.versions()
        items = [{"version": v.version, "name": v.name, "created_at": v.created_at} for v in stored]
        out: dict[str, Any] = {"items": items}
        lines = [f"{short_version(v.version)}  {v.name}" for v in stored]
        if tenant is not None and env is not None:
            current = policies.active(tenant, env)
            out["active"] = _activation(current) if current else None
            shown = short_version(current.version) if current else "none"
            lines.append(f"active for {tenant}/{env}: {shown}")
        _emit(out, as_json, "\n".join(lines) or "no stored policy versions")
