"""``aegis demo --json`` as a user runs it: a subprocess that starts everything, runs every scenario
through the SDK, stops everything and exits 0 only if every outcome was the expected one."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXPECTED = {
    "allowed": "allowed",
    "denied": "refused: access_denied",
    "replay": "refused: replay_detected",
    "forged_parent": "refused: parent_signature_invalid",
    "pii": "sanitized",
    "audit": "verified",
}
AEGIS = [sys.executable, "-m", "aegis.cli.main"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_json_reports_every_expected_outcome_and_stops(tmp_path: Path) -> None:
    env = {**os.environ, "AEGIS_CONFIG": str(tmp_path / "absent.yaml")}
    done = subprocess.run(
        [*AEGIS, "demo", "--json"], capture_output=True, text=True, timeout=180, env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    result = json.loads(done.stdout)
    assert result["ok"] is True
    outcomes = {o["name"]: o for o in result["scenarios"]}
    for name, actual in EXPECTED.items():
        assert outcomes[name]["ok"] is True, outcomes[name]
        assert outcomes[name]["actual"] == actual
        assert outcomes[name]["skipped"] is False
    for name in ("allowed", "denied", "replay", "pii"):
        assert outcomes[name]["decision_id"], f"{name} has no decision id"
    approval = outcomes["approval"]
    if importlib.util.find_spec("aegis.gateway.approval_gate") is not None:
        assert approval["ok"] is True and approval["skipped"] is False, approval
        assert approval["actual"].startswith("approval_needed → approved → allowed once")
    else:
        assert approval["skipped"] is True
    # Everything it started is stopped: nothing listens on its ports any more.
    ports = [int(url.rsplit(":", 1)[1]) for url in result["urls"].values()]
    assert ports and not any(_listening(p) for p in ports)
    assert not (tmp_path / "aegis.yaml").exists()  # the set-up lived in a temporary directory


def test_demo_help_names_its_options() -> None:
    done = subprocess.run([*AEGIS, "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--url", "--keep", "--json", "--admin-key-file"):
        assert option in done.stdout


def test_keep_leaves_it_running_until_interrupted(tmp_path: Path) -> None:
    import signal
    import time

    import httpx

    env = {**os.environ, "AEGIS_CONFIG": str(tmp_path / "absent.yaml"), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*AEGIS, "demo", "--keep"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("admin API key"):
                break
        text = "".join(lines)
        assert "still running" in text, text
        urls = {
            parts[0]: parts[1]
            for parts in (ln.split() for ln in text.split("still running", 1)[1].splitlines())
            if len(parts) == 2 and parts[1].startswith("http://")
        }
        assert httpx.get(f"{urls['gateway']}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{urls['control-plane']}/healthz").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        proc.stdout.close()
    assert code == 0
    ports = [int(u.rsplit(":", 1)[1]) for u in urls.values()]
    assert not any(_listening(p) for p in ports)


def _site(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A directory set up by ``aegis init``, and an environment with no proxy and no Aegis
    settings of the caller's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AEGIS_") and k.lower() not in ("http_proxy", "https_proxy")}  # fmt: skip
    site = tmp_path / "site"
    site.mkdir()
    done = subprocess.run([*AEGIS, "init", "--json"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=site)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return site, env


def test_a_remote_control_plane_over_http_is_refused_before_the_admin_key_travels(
    tmp_path: Path,
) -> None:
    """``--url http://aegis.example.com`` sent the admin API key, the most powerful credential,
    in clear; loopback stays allowed for a local control plane. A control plane that cannot be
    reached is one ``error:`` line, not a traceback."""
    site, env = _site(tmp_path)
    remote = subprocess.run(
        [*AEGIS, "demo", "--url", "http://aegis-control.example.com:8080"],
        capture_output=True, text=True, timeout=120, env=env, cwd=site,
    )  # fmt: skip
    assert remote.returncode == 1, remote.stderr
    assert remote.stderr.startswith("error: config_invalid: --url: http://aegis-control.example")
    assert "https" in remote.stderr and remote.stderr.count("\n") == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = subprocess.run(
        [*AEGIS, "demo", "--url", f"http://127.0.0.1:{closed}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=site,
    )  # fmt: skip
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr[-2000:]
    assert down.stderr.startswith(f"error: registry_unavailable: the control plane at "
                                  f"http://127.0.0.1:{closed} could not set the demo up")  # fmt: skip
    # The documented $AEGIS_ADMIN_KEY is a credential, not a setting the configuration refuses.
    keyed = subprocess.run(
        [*AEGIS, "demo", "--url", f"http://127.0.0.1:{closed}"],
        capture_output=True, text=True, timeout=120, env={**env, "AEGIS_ADMIN_KEY": "k"},
        cwd=site,
    )  # fmt: skip
    assert keyed.stderr.startswith("error: registry_unavailable"), keyed.stderr[-2000:]


def test_the_admin_key_is_read_from_a_file_never_from_the_command_line(tmp_path: Path) -> None:
    """Any user of the machine can read another's command line (ps, /proc): the key comes from
    --admin-key-file, $AEGIS_ADMIN_KEY or .aegis/admin.key."""
    site, env = _site(tmp_path)
    url = "http://127.0.0.1:9"

    def demo(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AEGIS, "demo", "--url", url, *args], capture_output=True,
                              text=True, timeout=120, env={**env, **extra}, cwd=site)  # fmt: skip

    on_argv = demo("--admin-key", "s3cret")
    assert on_argv.returncode == 2 and "No such option" in on_argv.stderr, on_argv.stderr
    missing = demo("--admin-key-file", str(tmp_path / "none"))
    assert missing.stderr.startswith("error: config_invalid: --url needs an admin API key")
    (tmp_path / "key").write_text("k\n")
    filed = demo("--admin-key-file", str(tmp_path / "key"), AEGIS_ADMIN_KEY="from-env")
    assert filed.stderr.startswith("error: registry_unavailable"), filed.stderr[-2000:]
    (site / ".aegis" / "admin.key").unlink()
    assert demo().stderr.startswith("error: config_invalid: --url needs an admin API key")
