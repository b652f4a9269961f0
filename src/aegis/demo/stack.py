"""The demo's servers: control plane, gateway and two tools, each a uvicorn server on loopback.

Embedded (the default): ``aegis init`` in a temporary directory, then one process serves the
control plane and a gateway over the same services (SQLite, in-memory stores), with routes to the
payment and CRM tools started beside them. Attached (``--url``): the control plane already runs;
agents are registered through its admin API and a demo gateway is started from its configuration
(same database and keys) for a tenant of its own, so nothing else running there is touched.
:meth:`DemoStack.stop` stops everything the demo started, in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import uvicorn

from aegis import config as config_module
from aegis.clock import SystemClock
from aegis.config import AegisConfig, GatewaySettings, load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.demo.tools import crm_app, payments_app
from aegis.errors import AegisError
from aegis.gateway.server import gateway_server
from aegis.policy.service import PolicyService
from aegis.policy.store import SqlPolicyStore
from aegis.sdk import AgentClient, PrivateKey
from aegis.sdk.wire import error_from_response
from aegis.server.services import Services, build_services

__all__ = ["APPROVER", "OWNER", "DemoStack", "Served"]

OWNER: Final = "owner@example.com"
APPROVER: Final = "approver@example.com"
_POLICY: Final = Path(__file__).with_name("policy.yaml")
_START_TIMEOUT: Final = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One ASGI app on a loopback port, served by uvicorn in a daemon thread; a gateway
    (``door``) as ``aegis gateway`` serves it (its request targets read as sent)."""

    def __init__(self, name: str, app: Any, port: int | None = None, *, door: bool = False) -> None:
        self.name, self.port = name, port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if door:
            self._server = gateway_server(app, "127.0.0.1", self.port, log_level="error")
        else:
            # Nothing believes a caller's X-Forwarded-* on loopback (uvicorn's default would).
            config = uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="error", lifespan="on",
                server_header=False, proxy_headers=False,
            )  # fmt: skip
            self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"demo-{name}", daemon=True)

    def start(self) -> Served:
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AegisError(f"the demo {self.name} did not start", code="server_error")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def _demo_config(
    directory: Path, cp: int, gw: int, routes: list[dict[str, Any]], approver_key: str | None
) -> str:
    lines = [
        f"issuer: http://127.0.0.1:{cp}",
        f"server: {{host: 127.0.0.1, port: {cp}}}",
        "database: {url: 'sqlite:///.aegis/aegis.db'}",
        "logging: {level: error}",
        "gateway:",
        f"  port: {gw}",
        "  policy_poll_interval: 0.2",
        "  upstream_timeout: 5",
        "  routes:",
        *(f"    - {r}" for r in routes),
    ]
    # Human approvals, when this build has them: the demo's admin key acts as the approver.
    if approver_key is not None and hasattr(config_module, "ApprovalSettings"):
        lines += [
            "approvals:",
            "  approvers:",
            # Quoted: a random key id such as 1234e5 or 0x1f would otherwise read as a number.
            f"    - {{id: {json.dumps(APPROVER)}, groups: [finance-approvers],"
            f" admin_keys: [{json.dumps(approver_key)}]}}",
        ]
    text = "\n".join(lines) + "\n"
    (directory / "aegis.yaml").write_text(text)
    return text


def _routes(payments: str, crm: str, tenant: str, env: str) -> list[dict[str, Any]]:
    where = {"tenant": tenant, "env": env}
    return [
        {"path_prefix": "/payments", "upstream": payments, "tool": "payments.transfer", **where},
        {"path_prefix": "/crm", "upstream": crm, "tool": "crm.customers", **where},
    ]


@dataclass
class DemoStack:
    control_plane: str
    gateway: str
    tenant: str
    env: str
    admin_key: str
    config: AegisConfig
    services: Services
    directory: Path
    #: Appended to agent ids, so that a demo against a running server never collides.
    suffix: str = ""
    _served: list[Served] = field(default_factory=list)
    _owned_services: bool = True

    # -- start and stop ----------------------------------------------------------------------

    @classmethod
    def embedded(cls, directory: Path) -> DemoStack:
        from aegis.cli.init import initialise
        from aegis.gateway.app import create_gateway_app
        from aegis.server.app import create_app

        init = initialise(directory)
        tools = [Served("payments", payments_app()).start(), Served("crm", crm_app()).start()]
        cp, gw = _free_port(), _free_port()
        routes = _routes(tools[0].url, tools[1].url, "acme", "prod")
        _demo_config(directory, cp, gw, routes, init.admin_key_id)
        config = load_config(directory / "aegis.yaml", environ={})
        services = build_services(config)
        stack = cls(
            f"http://127.0.0.1:{cp}", f"http://127.0.0.1:{gw}", "acme", "prod",
            init.admin_key, config, services, directory, _served=tools,
        )  # fmt: skip
        try:
            stack.install_policy()
            stack._served.append(Served("control-plane", create_app(services), cp).start())
            gateway_app = create_gateway_app(services, config.gateway)
            stack._served.append(Served("gateway", gateway_app, gw, door=True).start())
        except BaseException:
            stack.stop()
            raise
        return stack

    @classmethod
    def attached(cls, url: str, config_path: Path, admin_key: str, suffix: str) -> DemoStack:
        """Use a running control plane at ``url`` (configured by ``config_path``)."""
        from aegis.gateway.app import create_gateway_app

        config = load_config(config_path)
        # The issuer the control plane signs as, which `aegis up --port` moves off aegis.yaml's:
        # the demo's gateway must accept its tokens.
        meta = (
            httpx.get(f"{url.rstrip('/')}/.well-known/oauth-authorization-server", timeout=10.0)
            .raise_for_status()
            .json()
        )
        if isinstance(meta, dict) and isinstance(meta.get("issuer"), str):
            config = config.model_copy(update={"issuer": meta["issuer"]})
        tenant, env = f"demo-{suffix}", "demo"
        tools = [Served("payments", payments_app()).start(), Served("crm", crm_app()).start()]
        gw = _free_port()
        settings = GatewaySettings.model_validate(
            {"port": gw, "policy_poll_interval": 0.2,
             "routes": _routes(tools[0].url, tools[1].url, tenant, env)}
        )  # fmt: skip
        services = build_services(config)
        stack = cls(
            url.rstrip("/"), f"http://127.0.0.1:{gw}", tenant, env, admin_key, config, services,
            config_path.parent, suffix=f"-{suffix}", _served=tools,
        )  # fmt: skip
        try:
            stack.install_policy()
            stack._served.append(
                Served("gateway", create_gateway_app(services, settings), gw, door=True).start()
            )
        except BaseException:
            stack.stop()
            raise
        return stack

    def stop(self) -> None:
        """Stop every server the demo started, the gateway and control plane first."""
        for served in reversed(self._served):
            served.stop()
        self._served.clear()
        if self._owned_services:
            with contextlib.suppress(Exception):
                asyncio.run(self.services.aclose())
            self._owned_services = False

    @property
    def urls(self) -> dict[str, str]:
        return {s.name: s.url for s in self._served} | {
            "control-plane": self.control_plane,
            "gateway": self.gateway,
        }

    # -- set-up through the public faces ----------------------------------------------------

    def agent_id(self, name: str) -> str:
        return f"{name}{self.suffix}"

    def install_policy(self) -> str:
        text = _POLICY.read_text()
        for name in ("orchestrator", "finance", "crm"):
            ident = self.agent_id("finance-agent" if name == "finance" else
                                  "crm-agent" if name == "crm" else name)  # fmt: skip
            text = text.replace("${" + name.upper() + "}", ident)
        store = SqlPolicyStore(self.config.database_url())
        try:
            service = PolicyService(store, clock=SystemClock())
            activation = service.publish(
                text, tenant=self.tenant, env=self.env, actor="aegis-demo", file="demo/policy.yaml"
            )
        finally:
            store.close()
        return activation.version

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin API call with the demo's key; a refusal raises the SDK's typed error."""
        response = httpx.request(
            method,
            f"{self.control_plane}/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10.0,
        )
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json()

    def register(self, name: str, scopes: list[str]) -> AgentClient:
        """Register an agent with its public key and a ``private_key_jwt`` client (it signs
        grants and acts for others with that key); return its SDK client."""
        key = Ed25519SigningKey.generate()
        agent_id = self.agent_id(name)
        self.admin("POST", "/admin/agents", {
            "id": agent_id, "tenant": self.tenant, "env": self.env, "owner": OWNER,
            "display_name": name, "scopes": scopes, "jwks": [key.public.to_jwk()],
        })  # fmt: skip
        client = self.admin(
            "POST", "/admin/clients", {"agent_id": agent_id, "auth_method": "private_key_jwt"}
        )
        return AgentClient(self.control_plane, PrivateKey(client["client_id"], key))
