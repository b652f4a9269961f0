"""``aegis approvals``: list, show, approve and deny the requests of calls held for a human.

The CLI opens the configured database, like every command, so whoever runs it has the rights of
the database; ``--as`` names which configured approver decides (``approvals.approvers[].id``), and
the service still checks that approver's group and separation of duties. Every decision (and every
refused one) is in the audit log with ``channel: cli``. Refusals exit 1 with one line on stderr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

import typer
from rich.console import Console

from aegis.approvals.model import State
from aegis.approvals.notifiers import request_lines
from aegis.approvals.service import ApprovalService
from aegis.approvals.wiring import approvals_for
from aegis.cli._common import JsonOpt, emit, open_services, table

__all__ = ["app"]

app = typer.Typer(help="Decide calls held for human approval.", no_args_is_help=True)

ApprovalId = Annotated[str, typer.Argument(help="The approval id (apr_...).")]
As = Annotated[str, typer.Option("--as", help="The configured approver who decides (its id).")]
Reason = Annotated[str, typer.Option(help="Why (kept in the audit log, shown to the agent).")]


@contextmanager
def _service(ctx: typer.Context) -> Iterator[ApprovalService]:
    with open_services(ctx) as services:
        service = approvals_for(services)
        try:
            yield service
        finally:
            service.close()


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _show(view: dict[str, Any], console: Console) -> None:
    for name, value in view.items():
        if name in ("query", "headers"):  # [name, value] pairs, one a line, values quoted
            lines = request_lines(value, []) if name == "query" else request_lines([], value)
            value = "".join(f"\n  {line}" for line in lines)
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        if name.endswith("_at") and isinstance(value, float):
            shown = _when(value)
        console.print(f"{name:<20} {'' if shown is None else shown}", markup=False)


@app.command("list")
def list_approvals(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(
            help="Only this state: recording, pending, approving, approved, denied, expired, used."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List approval requests, newest first (expired ones are closed first)."""
    if state is not None and state not in get_args(State):
        raise typer.BadParameter(f"use one of {', '.join(get_args(State))}", param_hint="--state")
    with _service(ctx) as service:
        items = [r.to_dict() for r in asyncio.run(service.list_requests(state))]  # type: ignore[arg-type]
    rows = [
        [r["id"], r["state"], r["agent_id"], r["tool"], r["group"], _when(r["expires_at"])]
        for r in items
    ]
    emit(
        {"items": items},
        as_json,
        lambda c: c.print(table(["id", "state", "agent", "tool", "group", "expires"], rows)),
    )


@app.command()
def show(ctx: typer.Context, approval_id: ApprovalId, as_json: JsonOpt = False) -> None:
    """Show one approval request."""
    with _service(ctx) as service:
        view = asyncio.run(service.get(approval_id)).to_dict()
    emit(view, as_json, lambda c: _show(view, c))


def _decide(ctx: typer.Context, approval_id: str, who: str,
            action: Literal["approve", "deny", "withdraw"], reason: str, as_json: bool) -> None:  # fmt: skip
    with _service(ctx) as service:
        if action == "withdraw":
            job = service.withdraw(approval_id, via="cli", credential=who, reason=reason)
        else:
            approve = action == "approve"
            job = service.decide(
                approval_id, via="cli", credential=who, approve=approve, reason=reason
            )
        req = asyncio.run(job)
    done = "withdrawn" if action == "withdraw" else req.state
    view = req.to_dict()
    emit(view, as_json, lambda c: c.print(f"request {req.id} is {done} by {req.decided_by}"))


@app.command()
def approve(
    ctx: typer.Context,
    approval_id: ApprovalId,
    who: As,
    reason: Reason = "",
    as_json: JsonOpt = False,
) -> None:
    """Approve a pending request: the agent may then retry that exact call once."""
    _decide(ctx, approval_id, who, "approve", reason, as_json)


@app.command()
def deny(
    ctx: typer.Context,
    approval_id: ApprovalId,
    who: As,
    reason: Reason = "",
    as_json: JsonOpt = False,
) -> None:
    """Deny a pending request."""
    _decide(ctx, approval_id, who, "deny", reason, as_json)


@app.command()
def withdraw(
    ctx: typer.Context,
    approval_id: ApprovalId,
    who: As,
    reason: Reason = "",
    as_json: JsonOpt = False,
) -> None:
    """Withdraw an approval whose override has not been used yet: the call is denied after all."""
    _decide(ctx, approval_id, who, "withdraw", reason, as_json)
