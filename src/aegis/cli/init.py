"""``aegis init``: a ready development setup in one directory.

Writes the commented ``aegis.yaml``, creates the data directory ``.aegis/`` (mode 0700) with the
key-encryption key and the secret-hashing pepper (base64 of 32 random bytes each, mode 0600),
creates and migrates the SQLite database, generates the token-signing keys and a first ``admin``
API key. That key is printed once and also written to ``.aegis/admin.key`` (0600) so local
scripts can call the admin API. An existing setup is never overwritten without ``--force``, which
deletes the data directory (database, keys, CA) and starts over.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from aegis.cli._common import JsonOpt, actor, emit
from aegis.cli.template import render_config
from aegis.config import DEFAULT_CONFIG_FILE, AegisConfig, load_config
from aegis.errors import Conflict
from aegis.server.services import build_services
from aegis.types import AdminRole

__all__ = ["InitResult", "init", "initialise"]


@dataclass(frozen=True, slots=True)
class InitResult:
    config: str
    data_dir: str
    database: str
    admin_key_id: str
    #: The admin API key in clear: shown this once (and kept in ``admin_key_file``).
    admin_key: str
    admin_key_file: str


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only; never replace an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode() + "\n"


def initialise(
    directory: Path, *, force: bool = False, config_name: str = DEFAULT_CONFIG_FILE
) -> InitResult:
    """Create a development setup in ``directory`` (see the module docstring), its configuration
    file named ``config_name``."""
    directory = directory.resolve()
    config_path = directory / config_name
    layout = AegisConfig(base_dir=str(directory))
    data_dir = layout.path(layout.data_dir)
    if (config_path.exists() or data_dir.exists()) and not force:
        raise Conflict(
            f"{directory} already has an aegis setup ({config_path.name} or {layout.data_dir}/); "
            "use --force to replace it (this deletes the database and keys)"
        )
    if force and data_dir.exists():
        shutil.rmtree(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(mode=0o700)
    os.chmod(data_dir, 0o700)  # the umask may have narrowed it further, never widened it
    wrote_config = False
    try:
        _write_private(layout.path(layout.keys.kek_file), _random_key())
        _write_private(layout.path(layout.secrets.pepper_file), _random_key())
        config_path.write_text(render_config())
        wrote_config = True
        config = load_config(config_path)
        services = build_services(config)  # migrates the database, generates the signing keys
        try:
            key, secret = services.registry.create_admin_key("init", AdminRole.ADMIN, actor=actor())
        finally:
            asyncio.run(services.aclose())
        key_file = data_dir / "admin.key"
        _write_private(key_file, secret + "\n")
        for made in data_dir.iterdir():  # the database holds wrapped keys and secret hashes
            if made.is_file():
                os.chmod(made, 0o600)
    except BaseException:
        # Leave nothing half-made behind: a second `aegis init` must not need --force.
        shutil.rmtree(data_dir, ignore_errors=True)
        if wrote_config:
            config_path.unlink(missing_ok=True)
        raise
    return InitResult(
        config=str(config_path),
        data_dir=str(data_dir),
        database=config.database_url(),
        admin_key_id=key.key_id,
        admin_key=secret,
        admin_key_file=str(key_file),
    )


def show(result: InitResult, console: Console) -> None:
    console.print(f"wrote {result.config}")
    console.print(f"created {result.data_dir} (database, key files, signing keys)")
    console.print(f"admin API key (shown once, also in {result.admin_key_file}):")
    console.print(result.admin_key, markup=False, highlight=False)
    console.print("next: `aegis up`, then `aegis agents register ...`")


def init(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory to set up (default: the current one).")
    ] = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing setup: deletes .aegis/ first.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create aegis.yaml, .aegis/ (keys, database, signing keys) and a first admin API key."""
    result = initialise(directory, force=force)
    emit(asdict(result), as_json, lambda console: show(result, console))
