"""The demo's configuration file reads back as written, whatever random key id it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aegis.config import load_config
from aegis.demo.stack import _demo_config


@pytest.mark.parametrize("key_id", ["1234567890123456", "0123456701234567", "1e10", "null"])
def test_an_approver_key_id_that_looks_like_a_number_stays_a_string(
    tmp_path: Path, key_id: str
) -> None:
    route = {"path_prefix": "/pay", "upstream": "http://127.0.0.1:9", "tool": "payments",
             "tenant": "acme", "env": "prod"}  # fmt: skip
    text = _demo_config(tmp_path, 18080, 18443, [route], key_id)
    assert yaml.safe_load(text)["approvals"]["approvers"][0]["admin_keys"] == [key_id]
    config = load_config(tmp_path / "aegis.yaml", environ={})
    assert list(config.approvals.approvers[0].admin_keys) == [key_id]
