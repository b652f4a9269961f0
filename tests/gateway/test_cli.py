"""``aegis gateway run``: help text, and a one-line reason with a non-zero exit on bad config."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from aegis.cli.gateway import app
from tests.support.server import write_dev_config


def test_help() -> None:
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.output and "--host" in result.output


def test_no_routes_is_a_one_line_error(tmp_path: Path) -> None:
    config = write_dev_config(tmp_path, 8080)
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "gateway.routes is empty" in result.output


def test_bad_route_names_the_key(tmp_path: Path) -> None:
    config = write_dev_config(
        tmp_path,
        8080,
        "gateway:\n  routes:\n    - {path_prefix: pay, upstream: x, tool: t, tenant: a, env: p}\n",
    )
    result = CliRunner().invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert "gateway.routes.0.path_prefix" in result.output


def test_memory_stores_need_to_be_asked_for(tmp_path: Path) -> None:
    """A gateway process beside the control plane shares nothing kept in memory: with memory://
    stores a token revoked at the control plane would still be accepted. Refused unless asked
    for with --local-stores (which then gets past this check, to the routes)."""
    config = write_dev_config(
        tmp_path,
        8080,
        "gateway:\n  routes:\n    - {path_prefix: /p, upstream: 'http://127.0.0.1:9', tool: t,"
        " tenant: a, env: p}\n",
    )
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--port", "1"])
    assert result.exit_code == 2
    assert "stores.replay and stores.revocation are memory://" in result.output
    assert "--local-stores" in result.output
