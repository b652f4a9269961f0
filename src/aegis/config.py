"""Static settings: one ``aegis.yaml`` plus ``AEGIS_*`` environment overrides, parsed once.

Every key is validated up front and an error names the key and what is allowed. Environment
variables override file values with ``__`` between levels: ``AEGIS_TOKENS__DEFAULT_LIFETIME=600``
sets ``tokens.default_lifetime``; values are read as YAML scalars (``true``, ``600``, ``[a, b]``).

Reloadable state (policies, keys, the registry) is not configuration and lives in the stores.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aegis.errors import AegisError, ConfigError
from aegis.pki.spiffe import parse_spiffe_id

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "AegisConfig",
    "ApprovalChannel",
    "ApprovalSettings",
    "Approver",
    "AuditSettings",
    "DelegationSettings",
    "ExtAuthzSettings",
    "ExternalIssuer",
    "load_config",
    "read_secret_file",
]

DEFAULT_CONFIG_FILE = "aegis.yaml"
ENV_PREFIX = "AEGIS_"
#: ``AEGIS_*`` variables that are not settings: the configuration file's path, and credentials
#: CLI commands take from the environment to keep them off their command line.
NOT_SETTINGS: Final = frozenset(
    {"AEGIS_CONFIG", "AEGIS_ADMIN_KEY", "AEGIS_CLIENT_ID", "AEGIS_CLIENT_SECRET"}
)
#: Tokens never live longer than this, whatever the configuration says.
HARD_MAX_TOKEN_LIFETIME = 24 * 3600
#: Agent certificates never live longer than this, whatever the configuration says.
HARD_MAX_LEAF_LIFETIME = 7 * 24 * 3600


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _networks(v: tuple[str, ...]) -> tuple[str, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``::1``); the first that is neither is named."""
    for value in v:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return v


#: Who may read ``/metrics`` unless told otherwise: this machine only.
_LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    #: Largest request body the control plane accepts (bytes).
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Addresses or networks ``/metrics`` is served to (others: 403).
    metrics_clients: tuple[str, ...] = _LOOPBACK

    _metrics_clients = field_validator("metrics_clients")(_networks)


class DatabaseSettings(_Section):
    #: ``sqlite:///relative/or/absolute.db`` or ``postgresql+psycopg://user@host:5432/db``.
    url: str = "sqlite:///.aegis/aegis.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith("postgresql+psycopg://")):
            raise ValueError("use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")
        return v


class StoreSettings(_Section):
    #: ``memory://`` (one process) or ``redis://host:port/db`` (shared by every replica).
    replay: str = "memory://"
    revocation: str = "memory://"
    redis_prefix: str = "aegis:"
    #: Seconds Redis may take to answer a command (and to lend a pooled connection), and to
    #: open a connection. Past either the store is unavailable and the call is refused (503):
    #: a latency budget on the hot path, never a reason to allow.
    redis_timeout: float = Field(default=0.25, gt=0.0, le=10.0)
    redis_connect_timeout: float = Field(default=0.25, gt=0.0, le=10.0)
    #: How long registry reads may be served from the in-process cache (seconds). Capped at 1 s
    #: because a suspended agent, disabled client or suspended tenant must be refused by every
    #: replica within 1 s; a longer cache would let each replica keep allowing it that long.
    registry_cache_ttl: float = Field(default=0.25, ge=0.0, le=1.0)

    @field_validator("replay", "revocation")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if not (v == "memory://" or v.startswith(("redis://", "rediss://"))):
            raise ValueError("use memory:// or redis://HOST:PORT/DB (rediss:// for TLS)")
        return v


class TokenSettings(_Section):
    #: Seconds; what a token request gets unless it asks for less.
    default_lifetime: int = Field(default=300, ge=10)
    #: Seconds; no token is issued for longer. The doctor warns above one hour.
    max_lifetime: int = Field(default=3600, ge=10, le=HARD_MAX_TOKEN_LIFETIME)
    #: Clock skew allowed on exp/nbf/iat (seconds).
    leeway: int = Field(default=30, ge=0, le=300)
    #: JWS alg written in headers; both are accepted on input for Ed25519 keys (RFC 9864).
    signing_alg: Literal["EdDSA", "Ed25519"] = "EdDSA"
    #: Audiences a client may ask for (RFC 8707 ``resource`` or ``audience``); the first is default.
    audiences: tuple[str, ...] = ("aegis-gateway",)

    @model_validator(mode="after")
    def _lifetimes(self) -> TokenSettings:
        if self.default_lifetime > self.max_lifetime:
            raise ValueError("default_lifetime must not exceed max_lifetime")
        if not self.audiences:
            raise ValueError("audiences must name at least one audience")
        return self


class KeySettings(_Section):
    #: Key-encryption key (32 bytes, base64) for private keys at rest. Prefer the env variable
    #: AEGIS_KEYS__KEK or a file (kek_file) over writing it here.
    kek: str | None = None
    kek_file: str = ".aegis/kek"
    rotation_interval: int = Field(default=86400, ge=0)
    publish_lead: int = Field(default=300, ge=0)
    #: How often a running server re-reads the key store (rotations by other processes).
    reload_interval: float = Field(default=5.0, gt=0)


class OAuthSettings(_Section):
    #: Longest lifetime accepted for a private_key_jwt client assertion (seconds).
    assertion_max_lifetime: int = Field(default=300, ge=10, le=3600)
    #: Failed client authentications allowed per client and per source address per window.
    auth_failure_limit: int = Field(default=10, ge=1)
    auth_failure_window: int = Field(default=60, ge=1)


class SecretSettings(_Section):
    #: Key for the keyed hash (HMAC-SHA256) under which client secrets are stored.
    pepper: str | None = None
    pepper_file: str = ".aegis/pepper"
    #: How long the previous secret keeps working after a rotation (seconds).
    rotation_overlap: int = Field(default=86400, ge=0, le=30 * 86400)


class PkiSettings(_Section):
    """The internal CA (docs/pki.md). Key files are encrypted under a passphrase derived from the KEK."""

    #: SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (SPIFFE ID spec §2.1).
    trust_domain: str = "aegis.local"
    #: Directory of the CA files; the root key (``root.key.pem``) may be moved offline after init.
    ca_dir: str = ".aegis/pki"
    root_cert_file: str = "root.pem"
    root_key_file: str = "root.key.pem"
    intermediate_cert_file: str = "intermediate.pem"
    intermediate_key_file: str = "intermediate.key.pem"
    #: Agent certificate lifetime when none is asked for (seconds).
    leaf_default_lifetime: int = Field(default=3600, ge=5)
    #: No agent certificate lives longer than this (seconds), nor beyond its issuer.
    leaf_max_lifetime: int = Field(default=24 * 3600, ge=5, le=HARD_MAX_LEAF_LIFETIME)
    #: How long a CRL is valid after it is signed (nextUpdate - thisUpdate, seconds).
    crl_lifetime: int = Field(default=300, ge=10, le=86400)
    #: How long a bootstrap enrolment token stays usable (seconds).
    bootstrap_token_lifetime: int = Field(default=900, ge=10, le=86400)
    #: Immediate peers (IP addresses) whose client-certificate header is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: ``none`` ignores forwarded certificates; ``envoy`` reads ``x-forwarded-client-cert``;
    #: ``nginx`` reads ``x-ssl-client-cert`` (``$ssl_client_escaped_cert``).
    xfcc_mode: Literal["none", "envoy", "nginx"] = "none"
    xfcc_header: str = ""
    #: The registered serving agent (role ``server``) whose certificate the gateway presents: to
    #: callers on its mTLS listener and to upstreams on outbound mTLS. The gateway issues it from
    #: this CA and renews it at two thirds of its lifetime. Unset: plain HTTP in and out.
    gateway_agent: str | None = None

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, v: str) -> str:
        if not v or len(v) > 255 or not re.fullmatch(r"[a-z0-9._-]+", v):
            raise ValueError("use 1-255 lowercase letters, digits, '.', '-' or '_'")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for addr in v:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{addr!r} is not an IP address") from None
        return v

    @model_validator(mode="after")
    def _lifetimes(self) -> PkiSettings:
        if self.leaf_default_lifetime > self.leaf_max_lifetime:
            raise ValueError("leaf_default_lifetime must not exceed leaf_max_lifetime")
        if self.xfcc_mode != "none" and not self.trusted_proxies:
            raise ValueError("xfcc_mode needs trusted_proxies: name the proxy addresses")
        return self


class GatewayRoute(_Section):
    """One upstream behind the gateway (docs/gateway.md): the longest matching prefix wins."""

    path_prefix: str
    #: When set, only requests whose Host (without port) equals this match the route.
    host: str | None = None
    #: Base URL the request is forwarded to (``http(s)://host:port[/base]``).
    upstream: str
    tool: str
    tenant: str
    env: str
    #: An audience tokens must also carry for this route (besides ``gateway.audience``).
    audience: str | None = None
    #: Accept tokens without a single-use proof (no DPoP proof, not ``single_use``). Off: a stolen
    #: bearer token could be replayed at will.
    allow_bearer: bool = False
    #: Refuse calls that did not come with a verified client certificate (mTLS from the caller, or
    #: forwarded by a trusted proxy), before any token or policy is looked at (``cert_required``).
    require_client_cert: bool = False
    #: For an ``https`` upstream certified by the Aegis CA: the SPIFFE ID its certificate must
    #: name. Unset, any certificate the CA issued for serving is accepted for this upstream.
    upstream_spiffe_id: str | None = None
    #: The key a Rails upstream's ParamsWrapper (``wrap_parameters``, on for JSON by default)
    #: files a JSON body's members under: the controller reads ``params[key]``, the body's own
    #: ``key`` member when it sends one. Set, a body sending that member is refused when the
    #: policy for the tool reads the body, which policy reads at the top level.
    wrap_parameters: str | None = Field(default=None, min_length=1, max_length=128)
    #: The upstream is an MCP server's Streamable HTTP endpoint: each POST is one JSON-RPC
    #: message, and a ``tools/call`` is decided as the tool ``<tool>.<name>`` (docs/gateway.md).
    mcp: bool = False
    #: On an MCP route, accept ``tools/call`` arguments whose value is a string of JSON text (an
    #: object, array or null). Refused by default: the Python MCP SDK's servers parse such
    #: strings before the tool runs, so policy would read a string where the tool gets an
    #: object. Set it only for a server that does not, or when policy reads no argument.
    mcp_json_text_arguments: bool = False

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError("path_prefix must start with '/' and have no query or fragment")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        # Matched against the Host header without its port, and the host DPoP proofs name.
        if v is not None and (not v or any(c in v for c in "/?#@ \t") or
                              (":" in v and not v.startswith("["))):  # fmt: skip
            raise ValueError("host is a host name or [IPv6] literal, without port, path or scheme")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or "?" in v or "#" in v:
            raise ValueError("use an http(s) URL without a query or fragment")
        return v.rstrip("/")

    @field_validator("upstream_spiffe_id")
    @classmethod
    def _upstream_id(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_spiffe_id(v)
            except AegisError as exc:
                raise ValueError(exc.message) from None
        return v

    @model_validator(mode="after")
    def _pinned_needs_tls(self) -> GatewayRoute:
        if self.upstream_spiffe_id is not None and not self.upstream.startswith("https://"):
            raise ValueError("upstream_spiffe_id needs an https upstream")
        if self.mcp_json_text_arguments and not self.mcp:
            raise ValueError("mcp_json_text_arguments applies to an MCP route (mcp: true) only")
        return self


class GatewayAllow(_Section):
    """One allow-list entry, used only while no policy is active for the route's tenant/env."""

    tool: str
    #: Agent ids allowed; ``*`` allows any verified agent of the route's tenant and env.
    agents: tuple[str, ...] = ("*",)


class ExtAuthzSettings(_Section):
    """The ext_authz front doors beside a real proxy (``gateway.ext_authz``, docs/gateway.md).

    Both are off unless a port is set. They decide with the same pipeline and ``gateway.routes``.
    """

    #: Envoy ext_authz v3 gRPC ``Authorization/Check`` (unset: off).
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    grpc_host: str = "127.0.0.1"
    #: HTTP ext_authz: Envoy's HTTP service mode or nginx ``auth_request`` (unset: off).
    http_port: int | None = Field(default=None, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    #: ``envoy``: the check request's method and path are the original's (after ``path_prefix``);
    #: ``nginx``: the original method and URI arrive in ``original_method_header`` and
    #: ``original_uri_header``, believed only from ``trusted_proxies``.
    http_mode: Literal["envoy", "nginx"] = "envoy"
    #: Envoy mode: the ``path_prefix`` of Envoy's ``http_service``, removed from the check path.
    path_prefix: str = ""
    original_uri_header: str = "x-original-uri"
    original_method_header: str = "x-original-method"
    #: Immediate peers (IP addresses) whose forwarded request facts (original URI and method,
    #: scheme, client certificate) are believed. Required in nginx mode.
    trusted_proxies: tuple[str, ...] = ()
    #: gRPC door: Envoy's ext_authz filter buffers every request body (``with_request_body`` on
    #: every route, ``pack_as_bytes: true``), so a Check with no body and no ``content-length``
    #: describes a request without one. Unset, such a body is unseen: Envoy removes
    #: ``Transfer-Encoding`` before the check, and a chunked body it did not buffer looks like
    #: none (a tool whose policy reads the body then refuses the call).
    envoy_buffers_body: bool = False

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for addr in v:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{addr!r} is not an IP address") from None
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and (not v.startswith("/") or v.endswith("/") or "?" in v or "#" in v):
            raise ValueError("use '' or a path starting with '/' without a trailing '/' or query")
        return v

    @field_validator("original_uri_header", "original_method_header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", v):
            raise ValueError("use a header name of letters, digits and '-'")
        return v.lower()

    @model_validator(mode="after")
    def _consistent(self) -> ExtAuthzSettings:
        if self.http_port is not None and self.http_mode == "nginx" and not self.trusted_proxies:
            raise ValueError("http_mode nginx needs trusted_proxies: name the nginx addresses")
        if self.grpc_port is not None and self.grpc_port == self.http_port:
            raise ValueError("grpc_port and http_port must differ")
        return self


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    #: The audience access tokens must carry to be accepted here.
    audience: str = "aegis-gateway"
    #: The public base URL agents use (scheme://host[:port]); DPoP ``htu`` is checked against it.
    #: Unset: built from the request's scheme and Host header.
    public_url: str | None = None
    routes: tuple[GatewayRoute, ...] = ()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # an empty value (an unset chart value, say) means unset
        v = v.strip()
        parts = urlsplit(v)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if (parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc
                or parts.query or parts.fragment or "?" in v or "#" in v or not port_ok):  # fmt: skip
            raise ValueError(
                "public_url is what agents address: http(s)://host[:port][/base], without "
                "user, query or fragment"
            )
        return v.rstrip("/")

    #: Default-deny fallback while no policy is active for a tenant/env (empty: deny everything).
    allow: tuple[GatewayAllow, ...] = ()
    #: Largest request body accepted (bytes); larger is 413 payload_too_large.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    #: JSON bodies up to this size are parsed and shown to policy; larger ones are streamed.
    policy_body_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    upstream_timeout: float = Field(default=30.0, gt=0, le=3600)
    #: Longest wait for the next part of a request body (seconds); a client that sends nothing
    #: for longer is answered 408 ``request_timeout`` and its call goes no further.
    client_body_timeout: float = Field(default=30.0, gt=0, le=3600)
    #: Longest time a whole request body may take to arrive (seconds), however steadily it drips:
    #: a streamed call holds one of the pooled upstream connections meanwhile. Then 408.
    client_body_deadline: float = Field(default=300.0, gt=0, le=86400)
    #: How often the gateway checks for a newly activated policy version (seconds).
    policy_poll_interval: float = Field(default=2.0, gt=0, le=300)
    #: How long an MCP session stays held for the agent that opened it after its last call
    #: (seconds; held in the replay store). Keep it longer than the MCP servers keep an idle
    #: session (the Python SDK's: 30 minutes): a hold that lapses first frees the session.
    mcp_session_idle: float = Field(default=86400.0, ge=600, le=30 * 86400)
    #: How many MCP sessions one agent may hold at once (an ``initialize`` past it is 429
    #: ``mcp_session_limit``; a session ended with DELETE, or idle past ``mcp_session_idle``,
    #: frees its place): no agent fills the replay store with sessions.
    mcp_sessions_per_agent: int = Field(default=1000, ge=1, le=1_000_000)
    #: How old a DPoP proof's ``iat`` may be, and how far ahead of this clock (seconds).
    dpop_iat_window: float = Field(default=60.0, gt=0, le=600)
    dpop_future_skew: float = Field(default=5.0, ge=0, le=60)
    #: Set either to require DPoP server nonces (RFC 9449 §9): 32 bytes, base64, the same on
    #: every replica (the nonces are HMACs under it). Unset: no nonces.
    dpop_nonce_key: str | None = None
    dpop_nonce_key_file: str | None = None
    #: A nonce is accepted for between one and two lifetimes (seconds).
    dpop_nonce_lifetime: float = Field(default=300.0, ge=10, le=3600)
    #: The Envoy / nginx ext_authz front doors (off by default).
    ext_authz: ExtAuthzSettings = ExtAuthzSettings()
    #: Addresses or networks ``/metrics`` is served to on the proxy port (others: 403).
    metrics_clients: tuple[str, ...] = _LOOPBACK

    _metrics_clients = field_validator("metrics_clients")(_networks)

    def nonce_key(self, base_dir: str) -> bytes | None:
        """The DPoP nonce key, or None when nonces are off; a bad key is a ``ConfigError``."""
        if self.dpop_nonce_key is None and self.dpop_nonce_key_file is None:
            return None
        file = Path(base_dir) / (self.dpop_nonce_key_file or "")
        return _key_bytes(self.dpop_nonce_key, file, "gateway.dpop_nonce_key")

    @model_validator(mode="after")
    def _unique_routes(self) -> GatewaySettings:
        keys = [(r.host, r.path_prefix) for r in self.routes]
        if len(set(keys)) != len(keys):
            raise ValueError("two routes have the same host and path_prefix")
        for mcp in (r for r in self.routes if r.mcp):
            # An MCP route's tool calls are decided as "<tool>.<name>": another route's tool
            # under that name would share their rules ("repo.admin" + "x" and "repo" + "admin.x"),
            # and a plain route named as the MCP route would share its session's rules.
            clash = next((r.tool for r in self.routes if r.tool.startswith(mcp.tool + ".")), None)
            if clash is not None:
                raise ValueError(
                    f"the route tool {clash!r} lies under the MCP route tool {mcp.tool!r}, whose "
                    f"tool calls are decided as {mcp.tool!r}.<name>: rename one of them"
                )
            if any(r.tool == mcp.tool and not r.mcp for r in self.routes):
                raise ValueError(
                    f"the tool {mcp.tool!r} names an MCP route and a route that is not one: "
                    "rename one of them"
                )
        if self.port in (self.ext_authz.grpc_port, self.ext_authz.http_port):
            raise ValueError("ext_authz ports must differ from gateway.port")
        return self


class Approver(_Section):
    """One person who may decide approval requests (``approvals.approvers[]``, docs/approvals.md)."""

    #: The approver's identity as audited, normally an e-mail address (compared case-insensitively
    #: with an agent's ``owner`` for separation of duties).
    id: str = Field(min_length=1, max_length=256)
    #: Approver groups this person belongs to (a rule's ``approval.group`` names one).
    groups: tuple[str, ...] = Field(min_length=1)
    #: Admin API key ids (``aegis_ak_<key_id>_...``) that act as this approver over the admin API.
    admin_keys: tuple[str, ...] = ()
    #: The Slack user id (``U...``) whose button presses are this approver's.
    slack_user: str | None = None
    #: The Teams user (``from.aadObjectId``) whose replies are this approver's.
    teams_user: str | None = None
    #: The tenants whose requests this person may decide; unset, every tenant's (group names are
    #: one namespace across tenants: in a shared deployment, scope each approver here).
    tenants: tuple[str, ...] | None = Field(default=None, min_length=1)


class ApprovalChannel(_Section):
    """Where new approval requests are announced (``approvals.channels.<name>``)."""

    kind: Literal["slack", "teams", "webhook"]
    #: The incoming-webhook URL messages are posted to.
    url: str
    #: Slack signing secret / Teams outgoing-webhook key (base64) / webhook HMAC key. Prefer
    #: ``secret_file`` (relative to the config file) over writing it here.
    secret: str | None = None
    secret_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("use an http(s) URL")
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> ApprovalChannel:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret or secret_file")
        return self

    def secret_bytes(self, base_dir: str, name: str) -> bytes:
        """The channel's key; a missing file or an empty secret is a ``ConfigError``."""
        key = f"approvals.channels.{name}.secret"
        text = self.secret
        if text is None:
            text = read_secret_file(Path(base_dir) / (self.secret_file or ""))
        if not text:
            raise ConfigError(f"{key}: not set or {self.secret_file} is missing or empty", key=key)
        return text.encode("utf-8")


class ApprovalSettings(_Section):
    """Human approvals (docs/approvals.md)."""

    approvers: tuple[Approver, ...] = ()
    channels: dict[str, ApprovalChannel] = Field(default_factory=dict)
    #: Seconds an override token is usable after the approval (and the approval stays open).
    override_lifetime: int = Field(default=300, ge=10, le=3600)
    #: Refuse a decision by the agent's owner (or the call's origin user) on its own request.
    separation_of_duties: bool = True
    #: Base URL of the control plane for the status URL agents poll; unset: ``issuer``.
    status_base_url: str | None = None
    #: Notification delivery: attempts per message and the first back-off (doubling) in seconds.
    delivery_attempts: int = Field(default=4, ge=1, le=10)
    delivery_backoff: float = Field(default=0.5, ge=0.0, le=60.0)
    delivery_timeout: float = Field(default=5.0, gt=0, le=60.0)
    #: How often the control plane closes (and audits) requests past their time, in seconds.
    sweep_interval: float = Field(default=15.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _unique(self) -> ApprovalSettings:
        for what in ("id", "slack_user", "teams_user"):
            values = [getattr(a, what) for a in self.approvers if getattr(a, what) is not None]
            if what == "id":
                values = [v.lower() for v in values]
            if len(set(values)) != len(values):
                raise ValueError(f"two approvers have the same {what}")
        for name in self.channels:
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
                raise ValueError(f"channel name {name!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
        keys = [k for a in self.approvers for k in a.admin_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("an admin key is listed for two approvers")
        return self


class AuditJsonlSink(_Section):
    """``audit.jsonl``: JSON Lines files, rotated by size (rotated files are never deleted here)."""

    path: str
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)


class AuditSyslogSink(_Section):
    """``audit.syslog``: RFC 5424 messages over TLS (RFC 5425, octet-counted framing)."""

    host: str
    port: int = Field(default=6514, ge=1, le=65535)
    #: CA bundle (PEM) the receiver's certificate must chain to; TLS is not optional.
    ca_file: str
    #: Client certificate and key (PEM) when the receiver requires mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None
    #: Name checked against the receiver's certificate (default: ``host``).
    server_name: str | None = None
    app_name: str = Field(default="aegis", pattern=r"^[!-~]{1,48}$")
    connect_timeout: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _pair(self) -> AuditSyslogSink:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        return self


class AuditOtlpSink(_Section):
    """``audit.otlp``: OTLP/HTTP logs (protobuf) to a collector's ``/v1/logs``."""

    endpoint: str
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or "#" in v:
            raise ValueError("use an http(s) URL such as http://127.0.0.1:4318/v1/logs")
        return v


class AuditSettings(_Section):
    """The ``audit`` section (docs/audit.md): checkpoints, retention and export sinks."""

    #: The issuer signed checkpoints name (default: the top-level ``issuer`` as configured).
    #: ``aegis up --port`` moves the token issuer to the port it serves on; checkpoints keep
    #: naming the configured one, so the CLI's exports and verification agree with the server.
    issuer: str | None = None
    #: How often ``aegis audit run`` extends the Merkle tree and signs a checkpoint (seconds).
    checkpoint_interval: float = Field(default=60.0, ge=1, le=86400)
    #: Records older than this are pruned up to a signed checkpoint (days; 0 keeps everything).
    retention_days: float = Field(default=0.0, ge=0, le=36500)
    #: Export cursors and dead-letter files live here.
    state_dir: str = ".aegis/audit-export"
    batch_size: int = Field(default=500, ge=1, le=10000)
    #: Retry backoff for a sink that is down: doubles from retry_initial up to retry_max seconds.
    retry_initial: float = Field(default=0.5, gt=0, le=60)
    retry_max: float = Field(default=30.0, gt=0, le=3600)
    #: Attempts before a batch goes to the dead-letter file; 0 retries a down sink forever.
    max_attempts: int = Field(default=0, ge=0, le=1000)
    jsonl: AuditJsonlSink | None = None
    syslog: AuditSyslogSink | None = None
    otlp: AuditOtlpSink | None = None

    @model_validator(mode="after")
    def _backoff(self) -> AuditSettings:
        if self.retry_initial > self.retry_max:
            raise ValueError("retry_initial must not exceed retry_max")
        return self


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class ExternalIssuer(BaseModel):
    """One trusted end-user token issuer (``delegation.external_issuers[]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Exact ``iss`` of the user's tokens.
    issuer: str
    #: The tenant whose agents may act for this issuer's users.
    tenant: str
    #: A JWK Set given inline (``{"keys": [...]}``) ...
    jwks: dict[str, Any] | None = None
    #: ... or the path of a JWK Set file, read once at start-up.
    jwks_file: str | None = None
    #: A value the user token's ``aud`` must contain; default: the Aegis issuer URL.
    audience: str | None = None
    #: The user token's ``typ`` when present (RFC 8725 §3.11), e.g. ``jwt`` or ``at+jwt``.
    typ: str = "jwt"
    require_may_act: bool = True
    #: Claim whose scopes narrow what the agent may do for the user; None: the user token does not.
    scope_claim: str | None = "scope"
    max_lifetime: int = Field(default=3600, ge=60, le=86400)

    @model_validator(mode="after")
    def _one_source(self) -> ExternalIssuer:
        if (self.jwks is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks (inline) or jwks_file")
        return self


class DelegationSettings(BaseModel):
    """The ``delegation`` section of ``aegis.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Longest delegation chain (links). Gateways use the same value.
    max_depth: int = Field(default=4, ge=1, le=8)
    external_issuers: tuple[ExternalIssuer, ...] = ()
    #: Tool name globs the doctor treats as high risk (policies must require a parent chain rule).
    high_risk_tools: tuple[str, ...] = ()


class AegisConfig(_Section):
    #: The token issuer (``iss``) and the public base URL of the control plane.
    issuer: str = "http://127.0.0.1:8080"
    data_dir: str = ".aegis"
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    stores: StoreSettings = StoreSettings()
    tokens: TokenSettings = TokenSettings()
    keys: KeySettings = KeySettings()
    oauth: OAuthSettings = OAuthSettings()
    secrets: SecretSettings = SecretSettings()
    logging: LogSettings = LogSettings()
    pki: PkiSettings = PkiSettings()
    delegation: DelegationSettings = DelegationSettings()
    gateway: GatewaySettings = GatewaySettings()
    audit: AuditSettings = AuditSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    #: Directory the config file was read from; relative paths resolve against it.
    base_dir: str = "."

    @model_validator(mode="before")
    @classmethod
    def _data_dir(cls, data: Any) -> Any:
        """The files the embedded defaults keep in ``data_dir`` follow it when it is set (the
        database, key files, CA and export state); each may still be set on its own."""
        if not isinstance(data, dict):
            return data
        where = data.get("data_dir")
        if not isinstance(where, str) or where.rstrip("/") in ("", ".aegis"):
            return data
        where = where.rstrip("/")
        follow = {
            ("database", "url"): f"sqlite:///{where}/aegis.db",
            ("keys", "kek_file"): f"{where}/kek",
            ("secrets", "pepper_file"): f"{where}/pepper",
            ("pki", "ca_dir"): f"{where}/pki",
            ("audit", "state_dir"): f"{where}/audit-export",
        }
        out = dict(data)
        for (section, key), value in follow.items():
            given = out.get(section) or {}
            if isinstance(given, dict) and key not in given:
                out[section] = {**given, key: value}
        return out

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")) or v.endswith("/") or "#" in v or "?" in v:
            raise ValueError("use an http(s) URL without a trailing slash, query or fragment")
        return v

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def evidence_issuer(self) -> str:
        """The issuer audit checkpoints and exports name (``audit.issuer``, else ``issuer``)."""
        return self.audit.issuer or self.issuer

    def database_url(self) -> str:
        url = self.database.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            return "sqlite:///" + str(self.path(url[len("sqlite:///") :]))
        return url

    def kek(self) -> bytes:
        return _key_bytes(self.keys.kek, self.path(self.keys.kek_file), "keys.kek")

    def pepper(self) -> bytes:
        return _key_bytes(
            self.secrets.pepper, self.path(self.secrets.pepper_file), "secrets.pepper"
        )


def read_secret_file(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _key_bytes(inline: str | None, file: Path, key: str) -> bytes:
    text = inline if inline is not None else read_secret_file(file)
    if text is None:
        raise ConfigError(
            f"{key}: not set and {file} does not exist; run `aegis init` or set AEGIS_"
            f"{key.upper().replace('.', '__')}",
            key=key,
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ConfigError(f"{key}: must be 32 bytes encoded as base64", key=key) from exc
    if len(raw) != 32:
        raise ConfigError(f"{key}: must be 32 bytes encoded as base64", key=key)
    return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        if path[-1] in ("kek", "pepper"):
            value = raw  # secrets stay strings exactly as given
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{name}: {'.'.join(path[:-1])} is not a section", key=".".join(path)
                )
            node = child
        node[path[-1]] = value


def load_config(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> AegisConfig:
    """Read ``path`` (or ``$AEGIS_CONFIG``, or ``./aegis.yaml`` if present, else defaults)."""
    env = os.environ if environ is None else environ
    chosen = Path(path) if path is not None else Path(env.get("AEGIS_CONFIG", DEFAULT_CONFIG_FILE))
    data: dict[str, Any] = {}
    if chosen.exists():
        try:
            loaded = yaml.safe_load(chosen.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{chosen}: not valid YAML: {exc}", key="") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{chosen}: the top level must be a mapping", key="")
        data = loaded
    elif path is not None:
        raise ConfigError(f"config file {chosen} does not exist; run `aegis init`", key="")
    data.setdefault("base_dir", str(chosen.resolve().parent))
    _apply_env(data, env)
    try:
        return AegisConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting; check the spelling against docs/configuration.md"
        raise ConfigError(f"{key}: {msg}", key=key) from exc
