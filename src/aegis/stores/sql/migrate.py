"""Alembic migrations, run programmatically: no alembic.ini is needed at run time.

The Alembic ``Config`` is built here in code and the engine handed to ``migrations/env.py``.
Failures are translated at this boundary: an unreachable database is ``Unavailable`` with the
calling store's code, and a database at a revision this version does not know (written by a newer
Aegis) is refused the same way rather than used with a schema the code does not understand.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from aegis.errors import Unavailable
from aegis.stores.sql.engine import make_engine

__all__ = ["HEAD", "current_revision", "upgrade"]

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0002"

#: Alembic runs env.py through a module-level proxy (``alembic.context``), so two upgrades in one
#: process must not overlap; across processes env.py takes a PostgreSQL advisory lock.
_UPGRADE_LOCK = threading.Lock()


def _config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(url_or_engine: str | Engine, *, code: str = "registry_unavailable") -> None:
    """Bring the schema to the newest revision; idempotent. ``code`` is the ``Unavailable``
    code to report failures with (the key store passes ``key_store_unavailable``)."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with _UPGRADE_LOCK:
            command.upgrade(_config(engine), "head")
    except SQLAlchemyError as exc:
        raise Unavailable("cannot migrate the database; is it reachable?", code=code) from exc
    except CommandError as exc:
        raise Unavailable(
            "the database schema is at a revision this version of aegis does not know; "
            "run the aegis version that last migrated it, or a newer one",
            code=code,
        ) from exc
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def current_revision(
    url_or_engine: str | Engine, *, code: str = "registry_unavailable"
) -> str | None:
    """The revision the database is at; None before the first ``upgrade``."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise Unavailable(
            "cannot read the schema revision; is the database reachable?", code=code
        ) from exc
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()
