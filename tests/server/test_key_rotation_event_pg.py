"""``admin_ops.rotate_keys`` (``POST /admin/keys/rotate``, ``aegis keys rotate``) writes the
``keys.rotated`` event in the rotation's own transaction: when the event cannot be written (here
a trigger refuses it), nothing is rotated. It used to commit the rotation and then fail to record
it, and an operator retrying would rotate twice. Real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aegis.config import load_config
from aegis.errors import AegisError
from aegis.server.admin_ops import rotate_keys
from aegis.server.services import build_services
from tests.support.pg import run_sql
from tests.support.server import write_dev_config


def test_key_rotation_is_not_committed_without_its_event(tmp_path: Path, fresh_pg_url: str) -> None:
    config = load_config(write_dev_config(tmp_path, 9), environ={})
    config = config.model_copy(
        update={"database": config.database.model_copy(update={"url": fresh_pg_url})}
    )
    services = build_services(config)
    try:
        before = services.keyring.signing_key().kid
        run_sql(fresh_pg_url, """
            CREATE FUNCTION refuse_rotation_events() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.type = 'keys.rotated' THEN RAISE EXCEPTION 'event log refuses'; END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_rotation_events BEFORE INSERT ON events
              FOR EACH ROW EXECUTE FUNCTION refuse_rotation_events();
        """)  # fmt: skip
        try:
            with pytest.raises(AegisError):
                rotate_keys(services, force=True, actor="admin_key:ops")
        finally:
            run_sql(fresh_pg_url, "DROP TRIGGER refuse_rotation_events ON events; "
                                "DROP FUNCTION refuse_rotation_events();")  # fmt: skip
        services.keyring.load()
        rotated = [
            e for e in services.registry_store.list_events(limit=1000) if e.type == "keys.rotated"
        ]
        assert (services.keyring.signing_key().kid, rotated) == (before, [])  # nothing happened
        done = rotate_keys(services, force=True, actor="admin_key:ops")
        [event] = [e for e in services.registry_store.list_events(limit=1000)
                   if e.type == "keys.rotated"]  # fmt: skip
        assert (event.subject, event.actor, event.data) == (
            f"key:{done['active']}",
            "admin_key:ops",
            {"force": True},
        )
        assert done["active"] != before
    finally:
        asyncio.run(services.aclose())
