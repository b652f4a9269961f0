"""The configured Redis latency budget reaches the stores that the services build."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegis.config import load_config
from aegis.server.services import build_services
from tests.support.server import write_dev_config

pytestmark = pytest.mark.redis


async def test_the_configured_redis_budget_reaches_both_stores(
    redis_url: str, tmp_path: Path
) -> None:
    """``stores.redis_timeout`` and ``stores.redis_connect_timeout`` bound every Redis call."""
    environ = {
        "AEGIS_STORES__REPLAY": redis_url,
        "AEGIS_STORES__REVOCATION": redis_url,
        "AEGIS_STORES__REDIS_TIMEOUT": "1.5",
        "AEGIS_STORES__REDIS_CONNECT_TIMEOUT": "0.75",
    }
    services = build_services(load_config(write_dev_config(tmp_path, 8080), environ=environ))
    try:
        for store in (services.replay, services.revocation):
            pool = store._r.connection_pool  # type: ignore[attr-defined]
            assert pool.timeout == 1.5
            assert pool.connection_kwargs["socket_timeout"] == 1.5
            assert pool.connection_kwargs["socket_connect_timeout"] == 0.75
    finally:
        await services.aclose()


async def test_the_default_budget_is_a_quarter_second(redis_url: str, tmp_path: Path) -> None:
    environ = {"AEGIS_STORES__REPLAY": redis_url}
    services = build_services(load_config(write_dev_config(tmp_path, 8080), environ=environ))
    try:
        pool = services.replay._r.connection_pool  # type: ignore[attr-defined]
        assert pool.timeout == 0.25
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.25
    finally:
        await services.aclose()
