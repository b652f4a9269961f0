"""``aegis demo``: the whole system in one command, with a readable report of what it proved.

Without ``--url`` it sets up Aegis in a temporary directory (embedded defaults), starts the
control plane, a gateway and two tools on loopback ports, registers an orchestrator, a finance
agent and a CRM agent, installs a policy and runs the reference scenarios through the SDK
(:mod:`aegis.demo.scenarios`). It stops everything it started (``--keep``: after Ctrl-C) and
exits 1 if any scenario did not have its expected outcome. ``--json`` prints one document.
"""

from __future__ import annotations

import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from aegis.cli._common import JsonOpt, config_file, emit
from aegis.demo.scenarios import Outcome, run_scenarios
from aegis.demo.stack import DemoStack
from aegis.errors import AegisError
from aegis.sdk.auth import refuse_cleartext
from aegis.sdk.errors import AegisClientError
from aegis.telemetry.logging import configure_logging

__all__ = ["demo"]

_MARK = {True: "[green]✔ pass[/]", False: "[red]✘ FAIL[/]"}


def _admin_key(key_file: Path | None, config: Path) -> str:
    """The admin API key for ``--url``: from ``--admin-key-file``, else ``$AEGIS_ADMIN_KEY``,
    else ``.aegis/admin.key`` beside the configuration; never from the command line, which
    other users of the machine can read."""
    if key_file is None and (given := os.environ.get("AEGIS_ADMIN_KEY")):
        return given
    path = key_file or config.parent / ".aegis" / "admin.key"
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise AegisError(f"cannot read the admin API key from {path}: {exc.strerror}",
                         code="config_invalid") from None  # fmt: skip
    if key:
        return key
    raise AegisError(
        "--url needs an admin API key: --admin-key-file, $AEGIS_ADMIN_KEY or .aegis/admin.key",
        code="config_invalid",
    )


def _report(result: dict[str, Any], console: Console) -> None:
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log or a pipe: one row per scenario
    console.print(f"[bold]Aegis demo[/] · tenant {result['tenant']} · {result['seconds']} s")
    for name, url in result["urls"].items():
        console.print(f"  {name:<14} {url}")
    table = Table("", "scenario", "expected", "outcome", "decision", "ms", box=None, pad_edge=False)
    for o in result["scenarios"]:
        mark = "[yellow]- skip[/]" if o["skipped"] else _MARK[o["ok"]]
        table.add_row(mark, o["title"], o["expected"], o["actual"],
                      (o["decision_id"] or "")[:10], str(o["ms"]))  # fmt: skip
    console.print(table)
    for o in result["scenarios"]:
        if o["detail"]:
            console.print(f"  [dim]{o['name']}: {o['detail']}[/]", highlight=False)
    verdict = "[green]every scenario had its expected outcome[/]" if result["ok"] else (
        "[red]some scenarios did not have their expected outcome[/]")  # fmt: skip
    console.print(verdict)


def _wait_for_interrupt(stack: DemoStack, as_json: bool) -> None:
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    if not as_json:
        console = Console()
        console.print("[bold]still running[/] (Ctrl-C stops everything):")
        for name, url in stack.urls.items():
            console.print(f"  {name:<14} {url}")
        console.print(f"  admin API key  {stack.directory / '.aegis' / 'admin.key'}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(stack: DemoStack, started: float, *, attached: bool) -> dict[str, Any]:
    outcomes: list[Outcome] = run_scenarios(stack)
    return {
        # A scenario may be skipped only against a running control plane (one without the
        # approval service, or whose admin key approves nothing); the embedded build has all.
        "ok": all(o.ok or (o.skipped and attached) for o in outcomes),
        "tenant": stack.tenant,
        "urls": stack.urls,
        "scenarios": [o.to_dict() for o in outcomes],
        "seconds": round(time.monotonic() - started, 2),
    }


def demo(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Use the control plane running here (with its --config)."),
    ] = None,
    admin_key_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-key-file",
            help="File holding the admin API key for --url (default: $AEGIS_ADMIN_KEY, else "
            ".aegis/admin.key); the key itself is never taken on the command line, which other "
            "users of this machine can read.",
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave everything running (URLs printed) until Ctrl-C.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Aegis's own logs.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a multi-agent system on Aegis and report allowed, denied, approval, replay, forged
    parent, PII and audit outcomes; exit 1 if any was not as expected."""
    configure_logging("info" if verbose else "critical")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aegis-demo-") as tmp:
        if url is None:
            stack = DemoStack.embedded(Path(tmp))
        else:
            try:
                refuse_cleartext(url)  # the admin API key is about to travel there
            except ValueError as exc:
                raise AegisError(f"--url: {exc}", code="config_invalid") from None
            config = config_file(ctx)
            key = _admin_key(admin_key_file, config)
            try:
                stack = DemoStack.attached(url, config, key, secrets.token_hex(3))
            except httpx.HTTPError as exc:
                raise AegisError(
                    f"the control plane at {url} could not set the demo up: "
                    f"{type(exc).__name__}: {exc}"[:400],
                    code="registry_unavailable",
                ) from exc
        try:
            try:
                result = _run(stack, started, attached=url is not None)
            except (AegisClientError, httpx.HTTPError) as exc:
                where = f"the control plane at {url}" if url else "the demo's control plane"
                raise AegisError(
                    f"{where} could not set the demo up: {type(exc).__name__}: {exc}"[:400],
                    code="registry_unavailable",
                ) from exc
            emit(result, as_json, lambda console: _report(result, console))
            if keep:
                _wait_for_interrupt(stack, as_json)
        finally:
            stack.stop()
    if not result["ok"]:
        raise typer.Exit(1)
