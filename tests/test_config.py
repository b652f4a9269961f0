"""Configuration: parsed once, fully validated, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis.config import load_config
from aegis.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "aegis.yaml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = load_config(environ={"AEGIS_CONFIG": str(tmp_path / "missing.yaml")})
    assert cfg.tokens.default_lifetime == 300
    assert cfg.stores.replay == "memory://"
    assert cfg.database_url().endswith(".aegis/aegis.db")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tokens:\n  max_lifetime: 999999\n", "tokens.max_lifetime"),
        ("tokens:\n  default_lifetime: 7200\n  max_lifetime: 3600\n", "tokens"),
        ("tokens:\n  signing_alg: HS256\n", "tokens.signing_alg"),
        ("stores:\n  replay: mysql://x\n", "stores.replay"),
        ("stores:\n  redis_timeout: 0\n", "stores.redis_timeout"),
        ("stores:\n  redis_connect_timeout: 60\n", "stores.redis_connect_timeout"),
        ("issuer: ftp://x\n", "issuer"),
        ("issuer: https://x/\n", "issuer"),
        ("server:\n  port: 0\n", "server.port"),
        ("tokenz: {}\n", "tokenz"),
        ("database:\n  url: mysql://root@x/db\n", "database.url"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert info.value.details["key"] == key
    assert str(info.value).startswith(key)


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "tokens:\n  default_lifetime: 120\n")
    cfg = load_config(
        path,
        environ={
            "AEGIS_TOKENS__DEFAULT_LIFETIME": "60",
            "AEGIS_STORES__REPLAY": "redis://127.0.0.1:6379/0",
        },
    )
    assert cfg.tokens.default_lifetime == 60
    assert cfg.stores.replay == "redis://127.0.0.1:6379/0"


def test_credentials_commands_read_from_the_environment_are_not_settings(tmp_path: Path) -> None:
    """``aegis demo`` documents $AEGIS_ADMIN_KEY and ``aegis agents cert`` $AEGIS_CLIENT_ID and
    $AEGIS_CLIENT_SECRET, to keep them off the command line; read as settings, each failed the
    command with ``admin_key: unknown setting`` before it was used."""
    credentials = {"AEGIS_ADMIN_KEY": "aegis_ak_x", "AEGIS_CLIENT_ID": "c",
                   "AEGIS_CLIENT_SECRET": "s"}  # fmt: skip
    cfg = load_config(_write(tmp_path, ""), environ=credentials)
    assert "aegis_ak_x" not in repr(cfg.model_dump())
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(_write(tmp_path, ""), environ={"AEGIS_ADMIN_KEYS": "x"})


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, ""), environ={"AEGIS_TOKENS__LEEWAY": "lots"})
    assert info.value.details["key"] == "tokens.leeway"


def test_key_files(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    cfg = load_config(path, environ={})
    with pytest.raises(ConfigError, match="aegis init"):
        cfg.kek()
    (tmp_path / ".aegis").mkdir()
    (tmp_path / ".aegis" / "kek").write_text("c2hvcnQ=")
    with pytest.raises(ConfigError, match="32 bytes"):
        cfg.kek()
    env_cfg = load_config(path, environ={"AEGIS_KEYS__KEK": "A" * 43 + "="})
    assert len(env_cfg.kek()) == 32


@given(st.text(max_size=40))
def test_arbitrary_yaml_never_escapes_as_anything_but_config_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "aegis.yaml"
        p.write_text(text)
        try:
            load_config(p, environ={})
        except ConfigError:
            pass


def test_data_dir_moves_the_files_the_embedded_defaults_keep(tmp_path: Path) -> None:
    """``data_dir`` was documented as where the embedded defaults keep their files, yet nothing
    but ``aegis init`` read it: the database and key files stayed under ``.aegis/``."""
    cfg = load_config(_write(tmp_path, "data_dir: state\nkeys:\n  kek_file: elsewhere/kek\n"),
                      environ={})  # fmt: skip
    assert cfg.database_url() == f"sqlite:///{tmp_path / 'state' / 'aegis.db'}"
    assert cfg.path(cfg.secrets.pepper_file) == tmp_path / "state" / "pepper"
    assert cfg.path(cfg.pki.ca_dir) == tmp_path / "state" / "pki"
    assert cfg.path(cfg.audit.state_dir) == tmp_path / "state" / "audit-export"
    assert cfg.path(cfg.keys.kek_file) == tmp_path / "elsewhere" / "kek"  # set on its own
    default = load_config(_write(tmp_path, ""), environ={})
    assert default.database_url() == f"sqlite:///{tmp_path / '.aegis' / 'aegis.db'}"
