"""``stores.registry_cache_ttl`` cannot exceed 1 s: a suspended agent, disabled client or suspended
tenant must be refused by every replica within 1 s, and each replica may serve a registry record
from memory for up to this long."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegis.config import load_config
from aegis.errors import ConfigError

KEY = "stores.registry_cache_ttl"


@pytest.mark.parametrize("ttl", ["1.5", "5", "5.0", "inf"])
def test_a_cache_ttl_over_one_second_is_refused_naming_the_key(tmp_path: Path, ttl: str) -> None:
    path = tmp_path / "aegis.yaml"
    path.write_text(f"stores:\n  registry_cache_ttl: {ttl}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.details["key"] == KEY
    assert str(info.value) == f"{KEY}: Input should be less than or equal to 1"


def test_a_cache_ttl_over_one_second_from_the_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={
                "AEGIS_CONFIG": str(tmp_path / "missing.yaml"),
                "AEGIS_STORES__REGISTRY_CACHE_TTL": "1.5",
            }
        )
    assert info.value.details["key"] == KEY


@pytest.mark.parametrize("ttl", [0.0, 0.25, 1.0])
def test_cache_ttls_up_to_one_second_are_accepted(tmp_path: Path, ttl: float) -> None:
    path = tmp_path / "aegis.yaml"
    path.write_text(f"stores:\n  registry_cache_ttl: {ttl}\n")
    assert load_config(path, environ={}).stores.registry_cache_ttl == ttl
