"""The commented development ``aegis.yaml`` that ``aegis init`` writes.

It is rendered from :class:`aegis.config.AegisConfig` itself, so every section and every setting
appears with its current default; :data:`COMMENTS` gives each a one-line explanation (a test checks
that none is missing). Secrets are never written here: the key files under ``.aegis/`` hold them.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

from aegis.config import AegisConfig

__all__ = ["COMMENTS", "render_config"]

_FALLBACK: Final = "see docs/configuration.md"

#: One line per setting, by dotted path.
COMMENTS: Final[dict[str, str]] = {
    "issuer": "token issuer (iss) and public base URL of the control plane",
    "data_dir": "directory for local state (database, key files); relative to this file",
    "server": "the control plane listener (aegis up)",
    "server.host": "listen address",
    "server.port": "listen port",
    "server.max_body_bytes": "largest request body accepted (bytes)",
    "server.metrics_clients": "addresses or networks served /metrics (others: 403)",
    "database": "registry, keys and events",
    "database.url": "sqlite:///PATH (embedded) or postgresql+psycopg://USER@HOST:PORT/DB",
    "stores": "single-use proofs and revocations",
    "stores.replay": "memory:// (one process) or redis://HOST:PORT/DB (shared by replicas)",
    "stores.revocation": "memory:// (one process) or redis://HOST:PORT/DB (shared by replicas)",
    "stores.redis_prefix": "prefix of every Redis key",
    "stores.redis_timeout": "seconds a Redis reply may take; slower is a refusal (503)",
    "stores.redis_connect_timeout": "seconds a Redis connect may take; slower is a refusal (503)",
    "stores.registry_cache_ttl": "seconds registry reads may be served from the process cache",
    "tokens": "access tokens",
    "tokens.default_lifetime": "seconds a token lives unless less is asked for",
    "tokens.max_lifetime": "seconds no token outlives (the doctor warns above 3600)",
    "tokens.leeway": "clock skew allowed on exp/nbf/iat (seconds)",
    "tokens.signing_alg": "JWS alg written in token headers: EdDSA or Ed25519 (RFC 9864)",
    "tokens.audiences": "audiences a client may ask for; the first is the default",
    "keys": "token-signing keys",
    "keys.kek": "key-encryption key inline (prefer kek_file or AEGIS_KEYS__KEK)",
    "keys.kek_file": "file holding the key-encryption key (base64 of 32 bytes)",
    "keys.rotation_interval": "seconds between scheduled rotations (0: rotate by hand only)",
    "keys.publish_lead": "seconds a next key is published before it may sign",
    "keys.reload_interval": "seconds between key store re-reads by a running server",
    "oauth": "the token endpoint",
    "oauth.assertion_max_lifetime": "longest private_key_jwt client assertion (seconds)",
    "oauth.auth_failure_limit": "failed client authentications allowed per window",
    "oauth.auth_failure_window": "the failure window (seconds)",
    "secrets": "client secrets",
    "secrets.pepper": "keyed-hash key inline (prefer pepper_file or AEGIS_SECRETS__PEPPER)",
    "secrets.pepper_file": "file holding the keyed-hash key (base64 of 32 bytes)",
    "secrets.rotation_overlap": "seconds a rotated-away secret keeps working",
    "logging": "structured JSON logs on stderr",
    "logging.level": "debug, info, warning or error",
    "pki": "the internal CA (aegis ca init; docs/pki.md)",
    "pki.trust_domain": "SPIFFE trust domain of agent certificates",
    "pki.ca_dir": "directory of the CA files",
    "pki.root_cert_file": "root certificate file in ca_dir",
    "pki.root_key_file": "root key file in ca_dir (may be moved offline after init)",
    "pki.intermediate_cert_file": "intermediate certificate file in ca_dir",
    "pki.intermediate_key_file": "intermediate key file in ca_dir",
    "pki.leaf_default_lifetime": "agent certificate lifetime when none is asked for (seconds)",
    "pki.leaf_max_lifetime": "longest agent certificate lifetime (seconds)",
    "pki.crl_lifetime": "seconds a CRL stays valid after it is signed",
    "pki.bootstrap_token_lifetime": "seconds an enrolment token stays usable",
    "pki.trusted_proxies": "IP addresses whose forwarded client certificates are believed",
    "pki.xfcc_mode": "none, envoy (x-forwarded-client-cert) or nginx (x-ssl-client-cert)",
    "pki.xfcc_header": "header name overriding the mode's default",
    "pki.gateway_agent": "serving agent whose certificate the gateway presents (mTLS in and out)",
    "delegation": "delegation chains (docs/delegation.md)",
    "delegation.max_depth": "longest delegation chain (links)",
    "delegation.external_issuers": "trusted end-user token issuers",
    "delegation.high_risk_tools": "tool globs the doctor treats as high risk",
    "gateway": "the data plane (aegis gateway run; docs/gateway.md)",
    "gateway.host": "listen address",
    "gateway.port": "listen port",
    "gateway.audience": "audience tokens must carry to be accepted",
    "gateway.public_url": "public base URL agents use (DPoP htu); null: from each request",
    "gateway.routes": "upstreams: path_prefix, upstream, tool, tenant, env",
    "gateway.allow": "allow-list used only while no policy is active (empty: deny all)",
    "gateway.max_body_bytes": "largest request body accepted (bytes)",
    "gateway.policy_body_bytes": "JSON bodies up to this size are shown to policy",
    "gateway.connect_timeout": "seconds to connect to an upstream",
    "gateway.upstream_timeout": "seconds to wait for an upstream answer",
    "gateway.client_body_timeout": "seconds to wait for the next part of a request body (408)",
    "gateway.client_body_deadline": "seconds a whole request body may take to arrive (408)",
    "gateway.metrics_clients": "addresses or networks served /metrics on the proxy port",
    "gateway.policy_poll_interval": "seconds between checks for a newly activated policy",
    "gateway.mcp_session_idle": "seconds an MCP session stays held for its agent after its last call",
    "gateway.mcp_sessions_per_agent": "MCP sessions one agent may hold at once (429 past it)",
    "gateway.dpop_iat_window": "how old a DPoP proof's iat may be (seconds)",
    "gateway.dpop_future_skew": "how far ahead of this clock a DPoP iat may be (seconds)",
    "gateway.dpop_nonce_key": "base64 32-byte DPoP nonce key, same on every replica; null: no nonces",
    "gateway.dpop_nonce_key_file": "file holding the DPoP nonce key instead (relative to base_dir)",
    "gateway.dpop_nonce_lifetime": "a DPoP nonce is accepted for one to two lifetimes (seconds)",
    "gateway.ext_authz": "ext_authz front doors beside Envoy or nginx (off unless a port is set)",
    "gateway.ext_authz.grpc_port": "Envoy ext_authz v3 gRPC Check port; null: off",
    "gateway.ext_authz.grpc_host": "gRPC ext_authz listen address",
    "gateway.ext_authz.http_port": "HTTP ext_authz port (Envoy http_service or nginx auth_request); null: off",
    "gateway.ext_authz.http_host": "HTTP ext_authz listen address",
    "gateway.ext_authz.http_mode": "envoy (original method/path are the check's) or nginx (X-Original-* headers)",
    "gateway.ext_authz.path_prefix": "envoy mode: Envoy http_service path_prefix removed from the check path",
    "gateway.ext_authz.original_uri_header": "nginx mode: header carrying $request_uri",
    "gateway.ext_authz.original_method_header": "nginx mode: header carrying $request_method",
    "gateway.ext_authz.trusted_proxies": "proxy IP addresses whose forwarded request facts are believed",
    "gateway.ext_authz.envoy_buffers_body": "Envoy sends every body (with_request_body on all routes)",
    "approvals": "human approvals for approval_needed calls (docs/approvals.md)",
    "approvals.approvers": "who decides: id, groups, admin_keys, slack_user, teams_user",
    "approvals.channels": "name: {kind: slack|teams|webhook, url, secret or secret_file}",
    "approvals.override_lifetime": "seconds an approval's one-time override is usable",
    "approvals.separation_of_duties": "an agent's owner (or the origin user) cannot approve it",
    "approvals.status_base_url": "base of the status URL agents poll; null: the issuer",
    "approvals.delivery_attempts": "attempts per notification",
    "approvals.delivery_backoff": "first pause between attempts (seconds, doubling)",
    "approvals.delivery_timeout": "seconds per notification attempt",
    "approvals.sweep_interval": "seconds between closing expired requests",
    "audit": "tamper-evident audit log: checkpoints, retention, export sinks (docs/audit.md)",
    "audit.issuer": "the issuer checkpoints name; default: issuer above, as written here",
    "audit.checkpoint_interval": "seconds between signed checkpoints (aegis audit run)",
    "audit.retention_days": "prune records older than this, up to a checkpoint; 0: keep all",
    "audit.state_dir": "export cursors and dead-letter files",
    "audit.batch_size": "records per export batch",
    "audit.retry_initial": "first retry delay for a down sink (seconds, doubling)",
    "audit.retry_max": "longest retry delay for a down sink (seconds)",
    "audit.max_attempts": "attempts before a batch is dead-lettered; 0: retry forever",
    "audit.jsonl": "JSON Lines export: path, max_bytes (rotation); null: off",
    "audit.syslog": "RFC 5424 syslog over TLS: host, port, ca_file; null: off",
    "audit.otlp": "OTLP/HTTP logs: endpoint (/v1/logs), headers; null: off",
}

#: Settings the loader fills in; never written.
_INTERNAL: Final = frozenset({"base_dir"})


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _lines(data: dict[str, Any], prefix: str, indent: str) -> list[str]:
    out: list[str] = []
    for name, value in data.items():
        path = f"{prefix}{name}"
        if path in _INTERNAL:
            continue
        out.append(f"{indent}# {COMMENTS.get(path, _FALLBACK)}")
        if isinstance(value, dict) and value:
            out.append(f"{indent}{name}:")
            out.extend(_lines(value, f"{path}.", indent + "  "))
        else:
            out.append(f"{indent}{name}: {_scalar(value)}")
    return out


def render_config() -> str:
    """The development configuration: every setting at its default, one comment line each."""
    defaults = AegisConfig().model_dump(mode="json")
    header = [
        "# Aegis configuration for local development, written by `aegis init`.",
        "# Every setting is shown at its default. Environment variables override it:",
        "# AEGIS_TOKENS__DEFAULT_LIFETIME=600 sets tokens.default_lifetime (docs/configuration.md).",
        "",
    ]
    return "\n".join(header + _lines(defaults, "", "")) + "\n"
