"""``aegis up``: the whole control plane in one process on the embedded defaults.

OAuth endpoints, admin API, JWKS, metrics and health are served by uvicorn from the configuration
in the current directory (or ``--config``). Without a configuration file it runs ``aegis init``
first, which prints the new admin API key once; apart from that nothing secret is printed. SIGTERM
and SIGINT stop it gracefully (in-flight requests finish, the stores close) with exit status 0.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
from collections.abc import Generator
from dataclasses import asdict
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console

from aegis.cli import init as init_cmd
from aegis.cli._common import JsonOpt, config_file, emit, load
from aegis.server.services import build_services
from aegis.telemetry.logging import configure_logging, hide_access_log_queries

__all__ = ["up"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - recognised, never bound


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would end
    by the signal; a clean stop of ``aegis up`` should exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _urls(base: str) -> dict[str, str]:
    return {
        "url": base,
        "token_endpoint": f"{base}/oauth/token",
        "introspection_endpoint": f"{base}/oauth/introspect",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "admin_api": f"{base}/v1/admin",
        "openapi": f"{base}/v1/openapi.json",
        "metrics": f"{base}/metrics",
        "ready": f"{base}/readyz",
    }


def _show(info: dict[str, Any], console: Console) -> None:
    console.print(f"aegis control plane on {info['url']} (issuer {info['issuer']})")
    for name, url in info.items():
        if name not in ("url", "issuer", "init"):
            console.print(f"  {name:<24} {url}")
    console.print("  admin API key: .aegis/admin.key (Authorization: Bearer ...); Ctrl-C stops")


def _log_config(*, to_stderr: bool) -> dict[str, Any]:
    """uvicorn's logging configuration, its access log on stderr when ``to_stderr``."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if to_stderr:
        config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def up(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address (default: server.host).")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Listen port (default: server.port).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the control plane until stopped; set it up first if there is no aegis.yaml."""
    path = config_file(ctx)
    created: dict[str, Any] = {}
    if not path.exists():
        # The file asked for (``--config DIR/custom.yaml``), not DIR/aegis.yaml beside it.
        result = init_cmd.initialise(path.parent, config_name=path.name)
        if as_json:  # the one JSON document on stdout carries it
            created = {"init": asdict(result)}
        else:
            init_cmd.show(result, Console(soft_wrap=True))
    config = load(ctx)
    server = config.server.model_copy(
        update={"host": host or config.server.host, "port": port or config.server.port}
    )
    update: dict[str, Any] = {"server": server}
    if config.issuer == _base_url(config.server.host, config.server.port):
        # The issuer is this server's own address (as `aegis init` writes it): it follows
        # --host/--port, so token endpoint, metadata, `iss` and assertion audiences stay right.
        # A wildcard listen address is no URL, so the issuer keeps its host then. An issuer set
        # to any other public URL is kept as configured.
        named = server.host if server.host not in _WILDCARDS else config.server.host
        update["issuer"] = _base_url(named, server.port)
        # Audit checkpoints keep naming the configured issuer, as the CLI's audit commands do:
        # an export of an untouched log must verify whatever port served it.
        update["audit"] = config.audit.model_copy(update={"issuer": config.evidence_issuer()})
    config = config.model_copy(update=update)
    from aegis.server.app import create_app  # the server stack loads only for `aegis up`

    configure_logging(config.logging.level)
    app = create_app(build_services(config))
    info = {"issuer": config.issuer, **_urls(_base_url(server.host, server.port)), **created}
    emit(info, as_json, lambda console: _show(info, console))
    sys.stdout.flush()
    uvicorn_server = _Server(
        uvicorn.Config(
            app,
            host=server.host,
            port=server.port,
            log_level=config.logging.level,
            lifespan="on",
            server_header=False,
            # With --json, stdout holds the one JSON document: the access log goes to stderr.
            log_config=_log_config(to_stderr=as_json),
            # Forwarded client addresses are believed only from pki.trusted_proxies, judged by
            # Aegis on the connection's own address (see aegis.gateway.server.gateway_server).
            proxy_headers=False,
        )
    )
    # uvicorn configured its loggers above; from now on its access log keeps no query string.
    hide_access_log_queries()
    from aegis.gateway.server import freeze_startup_heap

    freeze_startup_heap()
    uvicorn_server.run()
    if not uvicorn_server.started:
        raise typer.Exit(1)
