"""What every CLI verb group shares: the configuration, the services, output and failures.

Commands work directly on the configured database through :func:`build_services`, the same
wiring the server uses, so a change made here is seen by a running ``aegis up`` within its
registry cache lifetime. Each command prints either human output or, with ``--json``, one JSON
document on stdout and nothing else. Failures never print a traceback for an expected error:
the root group (:class:`RootGroup`) turns them into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from typer._click.exceptions import ClickException  # typer vendors click since 0.26
from typer.core import TyperGroup

from aegis.config import DEFAULT_CONFIG_FILE, AegisConfig, load_config
from aegis.errors import AegisError, ConfigError
from aegis.server.services import Services, build_services

__all__ = [
    "CliState",
    "JsonOpt",
    "RootGroup",
    "actor",
    "config_file",
    "emit",
    "existing_config",
    "load",
    "open_services",
    "table",
]

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")
]


@dataclass(frozen=True, slots=True)
class CliState:
    """Set by the root callback: the global ``--config`` option."""

    config: Path | None = None


def actor() -> str:
    """How events name a CLI caller: whoever can open the database acts with full rights."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"cli:uid-{os.getuid()}"


def config_file(ctx: typer.Context) -> Path:
    """``--config``, else ``$AEGIS_CONFIG``, else ``./aegis.yaml``."""
    state = ctx.find_root().obj
    if isinstance(state, CliState) and state.config is not None:
        return state.config
    return Path(os.environ.get("AEGIS_CONFIG", DEFAULT_CONFIG_FILE))


def existing_config(given: Path | None) -> Path | None:
    """``given``, else ``$AEGIS_CONFIG``, else ``./aegis.yaml``, which must exist (None: it does
    not, and the database is set in the environment). A missing file is an error: commands would
    otherwise create an empty database (and its directory) wherever they ran."""
    path = given if given is not None else Path(os.environ.get("AEGIS_CONFIG", DEFAULT_CONFIG_FILE))
    if path.exists():
        return path
    if "AEGIS_DATABASE__URL" not in os.environ:
        raise ConfigError(
            f"{path} does not exist; run `aegis init` here or pass --config PATH", key=""
        )
    return None


def load(ctx: typer.Context) -> AegisConfig:
    """The validated configuration (see :func:`existing_config`)."""
    config = load_config(existing_config(config_file(ctx)))
    config.kek()  # fail on missing key files before any store is opened
    config.pepper()
    return config


@contextmanager
def open_services(ctx: typer.Context) -> Iterator[Services]:
    services = build_services(load(ctx))
    try:
        yield services
    finally:
        asyncio.run(services.aclose())


def emit(data: Any, as_json: bool, human: Callable[[Console], None]) -> None:
    """Print ``data`` as JSON, or call ``human`` with a console on stdout."""
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        human(Console(soft_wrap=True))


def table(columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(*columns, box=None, pad_edge=False)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class RootGroup(TyperGroup):
    """The root command: every failure becomes one line on stderr and a non-zero exit.

    ``AegisError`` is ``error: <code>: <message>`` with exit status 1; usage errors keep click's
    status 2, in one line. Only unexpected errors (bugs) show a traceback.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except AegisError as exc:
            _fail(f"{exc.code}: {exc.message}", 1)
        except ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
