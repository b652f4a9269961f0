"""A real Aegis control plane on a loopback port, for tests: uvicorn in a background thread."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from aegis.config import AegisConfig, load_config
from aegis.server.app import create_app
from aegis.server.services import Services, build_services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_dev_config(directory: Path, port: int, extra_yaml: str = "") -> Path:
    """A minimal config with fresh key files, as `aegis init` would leave them."""
    data = directory / ".aegis"
    data.mkdir(exist_ok=True)
    for name in ("kek", "pepper"):
        (data / name).write_text(base64.b64encode(os.urandom(32)).decode())
    path = directory / "aegis.yaml"
    path.write_text(
        f"issuer: http://127.0.0.1:{port}\n"
        f"server:\n  port: {port}\n"
        f"database:\n  url: sqlite:///.aegis/aegis.db\n" + extra_yaml
    )
    return path


@dataclass
class RunningServer:
    url: str
    services: Services
    config: AegisConfig


@contextmanager
def run_server(directory: Path, extra_yaml: str = "") -> Iterator[RunningServer]:
    port = free_port()
    config = load_config(write_dev_config(directory, port, extra_yaml), environ={})
    services = build_services(config)
    app = create_app(services)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 10 s")
        time.sleep(0.05)
    try:
        yield RunningServer(url, services, config)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
