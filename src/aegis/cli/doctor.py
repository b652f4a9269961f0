"""``aegis doctor``: find risky settings before they matter (token lifetimes, delegation rules).

Checks, each a plain function returning :class:`Finding` records so tests and other front ends
(the dashboard) can run them without the CLI:

* ``token_lifetime`` — ``tokens.max_lifetime`` above one hour warns: a stolen token lives that long
  and revocation must then carry the weight (docs/security.md).
* ``delegation_depth`` — ``delegation.max_depth`` above the default of 4 warns.
* ``host_routes`` — a gateway host with routes of its own is matched only against them (as nginx
  server blocks and Envoy virtual hosts choose): each host-less route it does not also name warns,
  since calls to that host on that path are refused (``no_route``).
* ``mcp_routes`` — MCP routes an ext_authz door cannot serve whole: at the HTTP door, and at the
  gRPC door without ``gateway.ext_authz.envoy_buffers_body``, every GET and DELETE on them is
  refused (the door cannot see that they carry no body), so MCP clients go without the server's
  event stream; and a ``gateway.mcp_session_idle`` shorter than the 30 minutes the Python MCP
  SDK keeps an idle session lets a hold lapse while its session lives.
* ``origin_issuers`` — a tenant trusting more than one issuer of end-user tokens warns: each may
  have a user of the same name (``alice@example.com``), so a rule matching ``chain.origin_users``
  must also match ``chain.origin_iss``.
* ``high_risk_without_parent`` — a policy rule that allows a high-risk tool (``high_risk_tools``
  globs, from ``delegation.high_risk_tools`` or ``--high-risk-tool``) without requiring a verified
  delegation chain (a match on ``chain.parent`` or ``chain.depth``) is an error: such a tool should
  be reached only through an accountable parent agent.

The policy check reads rules through :class:`RuleView`, the small shape it needs (rule id, the tool
patterns it matches, whether it allows, whether it requires a parent chain); :func:`rule_views`
builds them from policy documents: the files given with ``--policy``, else the version active for
every tenant and environment in the database (see docs/delegation.md). A rule *requires a parent*
when its ``match.chain`` names ``parents`` or ``origin_users`` or sets ``min_depth`` of at least 1;
a shadow rule never lets a call through; a policy in shadow mode allows every call.

Exit status: 1 if any finding is an error (or, with ``--strict``, a warning), else 0. ``--json``
prints the findings as one JSON document instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, Protocol

import typer

from aegis.cli._common import existing_config
from aegis.config import AegisConfig, load_config
from aegis.errors import AegisError
from aegis.gateway.routing import bare_host
from aegis.policy.loader import load_file
from aegis.policy.model import PolicyDocument
from aegis.tokens.chain import DEFAULT_MAX_DEPTH
from aegis.tokens.external import DelegationSettings

__all__ = [
    "MAX_RECOMMENDED_LIFETIME",
    "Finding",
    "PolicyRule",
    "RuleView",
    "app",
    "check_config",
    "check_high_risk_rules",
    "doctor",
    "rule_views",
]

#: Longest token lifetime the doctor accepts without a warning (seconds).
MAX_RECOMMENDED_LIFETIME: Final = 3600

Level = Literal["warn", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str
    message: str
    #: Where: a config key or a policy rule id.
    subject: str


class RuleView(Protocol):
    """What the delegation check needs to know about one policy rule."""

    @property
    def id(self) -> str: ...

    @property
    def tools(self) -> Sequence[str]:
        """Tool names or globs the rule matches (``*`` for every tool)."""
        ...

    @property
    def allows(self) -> bool:
        """True when the rule's effect can let a call through (allow or sanitize)."""
        ...

    @property
    def requires_parent(self) -> bool:
        """True when the rule matches only calls with a verified chain (``chain.parent`` set or
        ``chain.depth`` at least 1)."""
        ...


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """A :class:`RuleView` of one rule of a policy document."""

    id: str
    tools: tuple[str, ...]
    allows: bool
    requires_parent: bool


def rule_views(doc: PolicyDocument) -> list[PolicyRule]:
    """What the delegation check needs from each rule of ``doc`` (ids are ``<policy>/<rule>``)."""
    name = doc.metadata.name
    if doc.spec.mode == "shadow":  # every call is allowed, whatever the rules say
        return [PolicyRule(f"{name} (shadow mode)", ("*",), True, False)]
    views: list[PolicyRule] = []
    for rule in doc.spec.rules:
        chain = rule.match.chain
        requires = chain is not None and bool(
            chain.parents or chain.origin_users or (chain.min_depth or 0) >= 1
        )
        views.append(
            PolicyRule(
                f"{name}/{rule.id}",
                tuple(rule.match.tools or ("*",)),
                rule.action != "deny" and not rule.shadow,
                requires,
            )
        )
    return views


def _delegation(config: AegisConfig) -> DelegationSettings:
    settings = getattr(config, "delegation", None)
    return settings if isinstance(settings, DelegationSettings) else DelegationSettings()


def check_config(config: AegisConfig) -> list[Finding]:
    findings: list[Finding] = []
    lifetime = config.tokens.max_lifetime
    if lifetime > MAX_RECOMMENDED_LIFETIME:
        findings.append(
            Finding(
                "warn",
                "token_lifetime",
                f"tokens.max_lifetime is {lifetime} s; keep it at or below "
                f"{MAX_RECOMMENDED_LIFETIME} s (the default token lifetime is 300 s)",
                "tokens.max_lifetime",
            )
        )
    depth = _delegation(config).max_depth
    if depth > DEFAULT_MAX_DEPTH:
        findings.append(
            Finding(
                "warn",
                "delegation_depth",
                f"delegation.max_depth is {depth}; chains longer than {DEFAULT_MAX_DEPTH} "
                "are hard to audit",
                "delegation.max_depth",
            )
        )
    findings.extend(_host_routes(config))
    findings.extend(_mcp_routes(config))
    findings.extend(_origin_issuers(config))
    return findings


def _origin_issuers(config: AegisConfig) -> list[Finding]:
    """A tenant trusting two issuers of end-user tokens (see the module docstring)."""
    by_tenant: dict[str, list[str]] = {}
    for trust in _delegation(config).external_issuers:
        by_tenant.setdefault(trust.tenant, []).append(trust.issuer)
    return [
        Finding(
            "warn",
            "origin_issuers",
            f"tenant {tenant!r} trusts {len(issuers)} issuers of user tokens "
            f"({', '.join(issuers[:4])}): each may have a user of the same name, so a rule on "
            "chain.origin_users must also match chain.origin_iss",
            "delegation.external_issuers",
        )
        for tenant, issuers in sorted(by_tenant.items())
        if len(issuers) > 1
    ]


#: How long the Python MCP SDK's servers keep an idle session (seconds).
MCP_SDK_SESSION_IDLE: Final = 1800


def _mcp_routes(config: AegisConfig) -> list[Finding]:
    """What MCP routes cannot get from the doors and settings configured (see the module
    docstring's ``mcp_routes``)."""
    gateway = config.gateway
    mcp = [r.path_prefix for r in gateway.routes if r.mcp]
    if not mcp:
        return []
    ext, findings = gateway.ext_authz, []
    doors = []
    if ext.http_port is not None:
        doors.append("the HTTP ext_authz door")
    if ext.grpc_port is not None and not ext.envoy_buffers_body:
        doors.append("the gRPC ext_authz door without envoy_buffers_body")
    if doors:
        findings.append(
            Finding(
                "warn",
                "mcp_routes",
                f"at {' and '.join(doors)}, every GET and DELETE on the MCP routes "
                f"{', '.join(mcp[:8])} is refused (the door cannot see that it carries no body): "
                "MCP clients go without the server's event stream; serve them through the "
                "reverse proxy, or set envoy_buffers_body with Envoy buffering every body",
                "gateway.ext_authz",
            )
        )
    if gateway.mcp_session_idle < MCP_SDK_SESSION_IDLE:
        findings.append(
            Finding(
                "warn",
                "mcp_routes",
                f"gateway.mcp_session_idle is {gateway.mcp_session_idle:g} s, shorter than the "
                f"{MCP_SDK_SESSION_IDLE} s the Python MCP SDK keeps an idle session: a hold that "
                "lapses first leaves the session to whichever agent names it next",
                "gateway.mcp_session_idle",
            )
        )
    return findings


def _host_routes(config: AegisConfig) -> list[Finding]:
    """The host-less routes each host with routes of its own does not serve (see the module
    docstring's ``host_routes``)."""
    routes = config.gateway.routes
    hostless = [r.path_prefix for r in routes if r.host is None]
    own: dict[str, list[str]] = {}
    for r in routes:
        if r.host is not None:
            own.setdefault(bare_host(r.host), []).append(r.path_prefix.rstrip("/"))
    findings = []
    for host, prefixes in sorted(own.items()):
        unserved = [
            p for p in hostless
            if not any(q == "" or p.rstrip("/") == q or p.startswith(q + "/") for q in prefixes)
        ]  # fmt: skip
        if unserved:
            findings.append(
                Finding(
                    "warn",
                    "host_routes",
                    f"calls to {host} are matched only against its own routes, so the host-less "
                    f"routes {', '.join(unserved[:8])} are refused there (no_route); add them "
                    "for that host too if it should serve them",
                    f"gateway.routes (host {host})",
                )
            )
    return findings


def _overlaps(pattern: str, high_risk: str) -> bool:
    """Whether a rule's tool pattern can match a tool that a high-risk glob names."""
    return fnmatch.fnmatchcase(pattern, high_risk) or fnmatch.fnmatchcase(high_risk, pattern)


def check_high_risk_rules(rules: Iterable[RuleView], high_risk: Sequence[str]) -> list[Finding]:
    """Flag rules that allow a high-risk tool while leaving ``parent_agent`` optional."""
    findings: list[Finding] = []
    for rule in rules:
        if not rule.allows or rule.requires_parent:
            continue
        hits = sorted({g for g in high_risk for t in rule.tools if _overlaps(t, g)})
        if hits:
            findings.append(
                Finding(
                    "error",
                    "high_risk_without_parent",
                    f"rule {rule.id} allows high-risk tools {hits} without requiring a "
                    "delegation chain; add a match on chain.parent or chain.depth",
                    rule.id,
                )
            )
    return findings


app = typer.Typer(help="Check the configuration and policies for risky settings.")


@app.command("doctor")
def doctor(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="aegis.yaml (default: $AEGIS_CONFIG or ./aegis.yaml)"),
    ] = None,
    high_risk_tool: Annotated[
        list[str] | None,
        typer.Option("--high-risk-tool", help="A high-risk tool glob (repeatable)."),
    ] = None,
    policy: Annotated[
        list[Path] | None,
        typer.Option(
            "--policy",
            help="Check this policy file instead of the active policies (repeatable).",
        ),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")
    ] = False,
) -> None:
    """Run every check and print one line per finding."""
    try:
        # Run where there is no aegis.yaml, it checked the defaults and an empty database it
        # created there, and passed: a CI gate that checked nothing.
        cfg = load_config(existing_config(config))
        globs = [*_delegation(cfg).high_risk_tools, *(high_risk_tool or [])]
        findings = check_config(cfg)
        # A --policy file is read (and must load) whether or not any check needs its rules.
        rules = _policy_rules(cfg, policy or []) if globs or policy else []
        findings += check_high_risk_rules(rules, globs)
    except AegisError as exc:
        typer.echo(f"error: {exc.code}: {' '.join(exc.message.split())}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"findings": [dataclasses.asdict(f) for f in findings]}, indent=2))
    for f in findings if not as_json else ():
        typer.echo(f"{f.level}: {f.check}: {f.message}")
    if not findings and not as_json:
        typer.echo("ok: no findings")
    failing = {"error", "warn"} if strict else {"error"}
    if any(f.level in failing for f in findings):
        raise typer.Exit(1)


def _policy_rules(config: AegisConfig, files: Sequence[Path]) -> list[RuleView]:
    """The rules of ``files``, else of the policy version active for each tenant/environment."""
    if files:
        return [view for f in files for view in rule_views(load_file(f))]
    from aegis.policy.store import SqlPolicyStore
    from aegis.stores import open_registry_store

    url = config.database_url()
    registry, store = open_registry_store(url), SqlPolicyStore(url)
    try:
        versions = {
            active.version
            for tenant in registry.list_tenants()
            for env in registry.list_environments(tenant.id)
            if (active := store.active(tenant.id, env.name)) is not None
        }
        return [view for v in sorted(versions) for view in rule_views(store.get(v))]
    finally:
        store.close()
        close = getattr(registry, "close", None)
        if close is not None:
            close()
