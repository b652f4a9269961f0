"""``approvals:`` settings are validated once, with the bad key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegis.approvals import build_approval_service
from aegis.approvals.directory import ApproverDirectory
from aegis.config import load_config
from aegis.errors import ConfigError
from aegis.server.services import build_services
from tests.support.server import write_dev_config


def _load(tmp_path: Path, yaml: str) -> object:
    return load_config(write_dev_config(tmp_path, 8080, yaml), environ={})


@pytest.mark.parametrize(
    ("yaml", "key", "message"),
    [
        ("approvals:\n  approvers: [{id: a, groups: [g]}, {id: A, groups: [h]}]\n",
         "approvals", "same id"),
        ("approvals:\n  approvers: [{id: a, groups: [g], slack_user: U1},"
         " {id: b, groups: [g], slack_user: U1}]\n", "approvals", "same slack_user"),
        ("approvals:\n  approvers: [{id: a, groups: [g], admin_keys: [k]},"
         " {id: b, groups: [g], admin_keys: [k]}]\n", "approvals", "admin key"),
        ("approvals:\n  approvers: [{id: a, groups: []}]\n", "approvals.approvers.0.groups", ""),
        ("approvals:\n  approvers: [{id: a, groups: [g], role: boss}]\n",
         "approvals.approvers.0.role", "unknown setting"),
        ("approvals:\n  channels: {s: {kind: slack, url: 'http://x'}}\n",
         "approvals.channels.s", "exactly one of secret"),
        ("approvals:\n  channels: {s: {kind: pager, url: 'http://x', secret: x}}\n",
         "approvals.channels.s.kind", ""),
        ("approvals:\n  channels: {s: {kind: slack, url: 'ftp://x', secret: x}}\n",
         "approvals.channels.s.url", "http"),
        ("approvals:\n  channels: {'Bad Name': {kind: slack, url: 'http://x', secret: x}}\n",
         "approvals", "channel name"),
        ("approvals:\n  override_lifetime: 5\n", "approvals.override_lifetime", ""),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(tmp_path: Path, yaml: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, yaml)
    assert info.value.details["key"] == key
    assert message in info.value.message


def test_missing_secret_file_fails_at_start_up_naming_the_channel(tmp_path: Path) -> None:
    config = load_config(write_dev_config(tmp_path, 8080, (
        "approvals:\n  channels: {ops: {kind: webhook, url: 'http://x', secret_file: nope}}\n"
    )), environ={})  # fmt: skip
    services = build_services(config)
    with pytest.raises(ConfigError) as info:
        build_approval_service(
            config, clock=services.clock, keyring=services.keyring, replay=services.replay
        )
    assert info.value.details["key"] == "approvals.channels.ops.secret"


def test_directory_finds_approvers_only_by_their_own_credential(tmp_path: Path) -> None:
    config = load_config(write_dev_config(tmp_path, 8080, (
        "approvals:\n  approvers: [{id: Carol@X.com, groups: [g], admin_keys: [k1],"
        " slack_user: U1, teams_user: T1}]\n"
    )), environ={})  # fmt: skip
    d = ApproverDirectory(config.approvals)
    assert d.find("cli", "carol@x.com") is not None
    assert d.find("api", "k1") is not None and d.find("api", "carol@x.com") is None
    assert d.find("slack", "U1") is not None and d.find("slack", "T1") is None
    assert d.find("teams", "T1") is not None and d.find("teams", "U1") is None
