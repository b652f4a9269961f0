"""``aegis init`` and ``aegis up`` as real processes, driven by the CLI while the server runs.

The CLI writes to the database the server reads: a client created by ``aegis clients create`` gets
a token at once, and an agent suspended by ``aegis agents suspend`` has its token refused by
introspection within a second. SIGTERM stops the server cleanly (exit status 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.server import free_port

pytestmark = pytest.mark.slow

AEGIS = [sys.executable, "-m", "aegis.cli.main"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_")}


def aegis(cwd: Path, *args: str) -> Any:
    """Run one CLI command to completion; return its JSON output."""
    done = subprocess.run(
        [*AEGIS, *args, "--json"], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _wait_ready(proc: subprocess.Popen[Any], url: str, output: Callable[[], object]) -> None:
    """Until ``aegis up`` at ``url`` is ready (at most 30 s); ``output`` tells why it ended."""
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, output()
        try:
            if httpx.get(f"{url}/readyz", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "aegis up was not ready within 30 s"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    made = aegis(tmp_path, "init")
    port = free_port()
    log = (tmp_path / "up.out").open("w")
    proc = subprocess.Popen(
        [*AEGIS, "up", "--port", str(port)],
        cwd=tmp_path,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, lambda: (tmp_path / "up.out").read_text())
        yield url, tmp_path, made["admin_key"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, (tmp_path / "up.out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_cli_changes_reach_the_running_server(server: tuple[str, Path, str]) -> None:
    url, directory, admin_key = server
    agent = aegis(
        directory,
        *("agents", "register", "finance-agent", "--tenant", "acme", "--env", "prod"),
        *("--owner", "alice@example.com", "--scope", "payments:write"),
    )
    assert agent["status"] == "active"
    client = aegis(directory, "clients", "create", "finance-agent")
    client_id, secret = client["client_id"], client["client_secret"]

    with httpx.Client(base_url=url, timeout=5) as http:
        issued = http.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
        assert issued.json()["scope"] == "payments:write"

        def introspect() -> dict[str, Any]:
            answer = http.post(
                "/oauth/introspect",
                data={"token": token},
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        assert introspect()["active"] is True
        # `aegis up --port` moved the issuer set by `aegis init` along with the listen port.
        meta = http.get("/.well-known/oauth-authorization-server").json()
        assert meta["issuer"] == url and meta["token_endpoint"] == f"{url}/oauth/token"
        assert introspect()["iss"] == url
        listed = http.get("/v1/admin/agents", headers={"Authorization": f"Bearer {admin_key}"})
        assert [a["id"] for a in listed.json()["items"]] == ["finance-agent"]

        # A careless client that puts the token or its secret in a URL: the access log drops
        # query strings, so neither reaches the server's output.
        http.get("/.well-known/jwks.json", params={"access_token": token})
        http.post(f"/oauth/introspect?token={token}&client_secret={secret}", data={})

        aegis(directory, "agents", "suspend", "finance-agent", "--reason", "integration test")
        suspended_at = time.monotonic()
        # Timed from when each introspection is sent: none sent 1 s after the suspension may
        # still find the token active (a slow round trip on a loaded runner is not the server's).
        while True:
            sent = time.monotonic() - suspended_at
            if (answer := introspect()) == {"active": False}:
                break
            assert sent < 1.0, answer
            time.sleep(0.05)

    out = (directory / "up.out").read_text()
    assert secret not in out and admin_key not in out  # the server prints no secret
    assert token not in out and token.split(".")[1] not in out
    assert '"GET /.well-known/jwks.json HTTP/1.1" 200' in out  # the access log is still there
    assert f"{url}/oauth/token" in out


def test_an_export_of_a_log_up_served_on_another_port_verifies(
    server: tuple[str, Path, str],
) -> None:
    """``aegis up --port`` moves the token issuer to its port; the checkpoints it signs kept
    naming that issuer too, while ``aegis audit export`` signs as aegis.yaml's issuer: an
    untouched log's export then failed ``audit verify`` ("signed by another issuer")."""
    _, directory, _ = server
    deadline = time.monotonic() + 20
    while True:  # the server's maintenance signs a checkpoint over the records
        exported = subprocess.run([*AEGIS, "audit", "export", "export.jsonl"], cwd=directory,
                                  env=_env(), capture_output=True, text=True, timeout=30)  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(x) for x in (directory / "export.jsonl").read_text().splitlines()]
        if any(x["type"] == "checkpoint" for x in lines):  # one the server signed
            break
        assert time.monotonic() < deadline, "the server signed no checkpoint within 20 s"
        time.sleep(0.5)
    evidence = subprocess.run([*AEGIS, "jwks", "--evidence"], cwd=directory, env=_env(),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    (directory / "evidence.json").write_text(evidence.stdout)
    verified = subprocess.run(
        [*AEGIS, "audit", "verify", "export.jsonl", "--jwks", "evidence.json", "--json"],
        cwd=directory, env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["issuer"] == "http://127.0.0.1:8080"  # aegis.yaml's


def test_up_sets_up_the_configuration_file_it_was_given(tmp_path: Path) -> None:
    """``aegis --config DIR/custom.yaml up`` where nothing is set up wrote DIR/aegis.yaml (and
    printed an admin key for it), then failed: custom.yaml still did not exist."""
    port = free_port()
    proc = subprocess.Popen(
        [*AEGIS, "--config", str(tmp_path / "custom.yaml"), "up", "--port", str(port), "--json"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", proc.communicate)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (tmp_path / "custom.yaml").exists() and not (tmp_path / "aegis.yaml").exists()
    # stdout is the one JSON document --json promises; the access log went to stderr.
    assert json.loads(out)["init"]["config"] == str(tmp_path / "custom.yaml")
    assert '"GET /readyz HTTP/1.1" 200' in err


def test_the_demo_runs_against_up_served_on_another_port(
    server: tuple[str, Path, str],
) -> None:
    """``aegis up --port`` moves the issuer to its port; the demo's gateway took aegis.yaml's, so
    every call it made was refused ``invalid_issuer``. It takes the control plane's now."""
    url, directory, _ = server
    done = subprocess.run([*AEGIS, "demo", "--url", url, "--json"], cwd=directory, env=_env(),
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    outcomes = {o["name"]: o for o in json.loads(done.stdout)["scenarios"]}
    assert outcomes["allowed"]["actual"] == "allowed"
    assert all(o["ok"] or o["skipped"] for o in outcomes.values()), outcomes
