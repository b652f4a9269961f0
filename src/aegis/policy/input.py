"""The policy input document: built in exactly one place, from one frozen :class:`PolicyCall`.

Like OPA's ``makeInput``, :func:`build_input` is the only function that shapes what a policy sees,
so the in-process evaluator, the Rego bundle, dry runs and policy tests all read the same document
(documented field by field in ``docs/policy.md``). The gateway converts its verified call context
into a ``PolicyCall``; nothing here trusts the caller beyond what the pipeline already verified.

Credentials never reach a policy: ``authorization``, ``cookie``, ``dpop`` and
``proxy-authorization`` headers are dropped even if a gateway selects them, because decisions and
their inputs are logged.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aegis.errors import InvalidRequest

__all__ = [
    "CREDENTIAL_HEADERS",
    "AgentInfo",
    "ChainInfo",
    "PolicyCall",
    "build_input",
    "call_from_dict",
    "fold_case",
    "loose_path",
    "path_variants",
    "without_format",
]

#: Header names (lowercase) that never enter a policy input document.
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie", "dpop", "proxy-authorization"})

AuthMethod = Literal["mtls", "dpop", "bearer"]
_AUTH_METHODS: Final = ("mtls", "dpop", "bearer")


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """The calling agent, as the registry knows it."""

    id: str
    roles: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """The verified delegation chain: ``agents`` from the first delegator to the immediate parent
    of the calling agent (so the last one is the parent), and the human the chain started from."""

    agents: tuple[str, ...] = ()
    origin_user: str | None = None
    #: The issuer that vouched for ``origin_user``: two issuers a tenant trusts may each have an
    #: ``alice@example.com``.
    origin_iss: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyCall:
    """Everything policy may look at for one call. Fields are verified facts, not claims."""

    tool: str
    agent: AgentInfo
    tenant: str
    env: str
    time: float  # unix seconds, from the injected clock
    resource: str | None = None
    method: str = "POST"
    path: str = "/"
    scopes: tuple[str, ...] = ()
    client_id: str | None = None
    jti: str | None = None
    auth_method: AuthMethod = "mtls"
    chain: ChainInfo = field(default_factory=ChainInfo)
    body: Any = None  # the parsed JSON request body, or None
    query: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


_LOOSE_END: Final = (".", " ")


def _fold_char(char: str) -> str:
    """``char`` lowercased after its simple upper-case mapping, as ASP.NET Core compares route
    text (``OrdinalIgnoreCase``): the dotless i (U+0131) is ``i``, the final sigma (U+03C2) the
    sigma (U+03C3), and the long Cyrillic de (U+1C81) the de (U+0434). A character whose upper
    case is longer (the sharp s) has no simple mapping and is only lowercased."""
    upper = char.upper()
    return upper.lower() if len(upper) == 1 else char.lower()


def loose_path(path: str) -> str:
    """``path`` as the loosest common upstream reads it: Unicode compatibility-normalised (NFKC:
    ``admin`` in FULLWIDTH letters is ``admin``), each segment without its ``;parameters``,
    trailing dots and spaces and leading spaces (Spring's path matcher trimmed tokens), in
    lower case as ASP.NET Core folds it (:func:`_fold_char`). Routes are chosen on it, and
    policy sees it as ``path_loose``: ``/Payments/Admin;x`` is ``/payments/admin`` to Express,
    Spring or IIS."""
    if not path.isascii():
        path = unicodedata.normalize("NFKC", path)
    if ";" in path or "./" in path or " /" in path or "/ " in path or path.endswith(_LOOSE_END):
        path = "/".join(seg.split(";", 1)[0].rstrip(". ").lstrip(" ") for seg in path.split("/"))
    return fold_case(path)


def fold_case(text: str) -> str:
    """``text`` in lower case as :func:`loose_path` folds it (:func:`_fold_char`)."""
    return text.lower() if text.isascii() else "".join(map(_fold_char, text))


#: Most dots the last segment of a path may hold: each is a reading the call is decided under.
MAX_FORMAT_DOTS: Final = 8
#: Extensions of scripts that servers run with the rest of the path as ``PATH_INFO``: PHP
#: (Apache's mod_php, nginx with ``fastcgi_split_path_info``), CGI, classic ASP.NET and IIS
#: ISAPI, ColdFusion. ``/admin.php/x`` runs ``/admin.php``.
SCRIPT_EXTENSIONS: Final = frozenset(
    {"php", "php3", "php4", "php5", "php7", "php8", "phtml", "phar", "cgi", "pl", "py", "asp",
     "aspx", "asmx", "ashx", "axd", "svc", "cfm", "cfc", "dll", "exe"}
)  # fmt: skip
#: Most segments naming a script (:data:`SCRIPT_EXTENSIONS`) a path may hold before its last.
MAX_SCRIPT_SEGMENTS: Final = 4


def path_variants(loose: str) -> tuple[str, ...]:
    """The other paths some upstreams serve a :func:`loose_path` as: without a trailing ``/``
    (Express and Rails serve ``/refund/`` as ``/refund``), that cut at each dot of its last
    segment (Rails routes take ``(.:format)`` on every path, Spring's suffix pattern match
    served ``/admin.x.y`` as ``/admin``, and ``/setup.exe/`` is ``/setup.exe`` to Express), and
    cut after each earlier segment naming a script (``/admin.php/x`` runs ``/admin.php``, see
    :data:`SCRIPT_EXTENSIONS`). The gateway decides a call under each, and denies when any is
    denied. Raises ``InvalidRequest`` for a last segment of more than :data:`MAX_FORMAT_DOTS`
    dots, or more than :data:`MAX_SCRIPT_SEGMENTS` script segments."""
    path = loose[:-1] if len(loose) > 1 and loose.endswith("/") else loose
    out = [path] if path != loose else []
    head, _, last = path.rpartition("/")
    if last.count(".") > MAX_FORMAT_DOTS:
        raise InvalidRequest(
            f"the path's last segment holds more than {MAX_FORMAT_DOTS} dots; each is a format "
            "some upstreams drop, and the call is decided under every reading"
        )
    at = last.find(".", 1)
    while at > 0:
        out.append(f"{head}/{last[:at]}")
        at = last.find(".", at + 1)
    if "." in head:
        segments = head.split("/")
        scripts = [
            "/".join(segments[: i + 1])
            for i, segment in enumerate(segments)
            if "." in segment[1:] and segment.rpartition(".")[2] in SCRIPT_EXTENSIONS
        ]
        if len(scripts) > MAX_SCRIPT_SEGMENTS:
            raise InvalidRequest(
                f"the path names more than {MAX_SCRIPT_SEGMENTS} scripts before its last segment "
                "(such as x.php/); each is a path some upstreams run, and the call is decided "
                "under every reading"
            )
        out += scripts
    return tuple(out)


def without_format(path: str) -> str:
    """``path`` without a trailing ``/`` and cut at its last segment's first dot: how a route
    prefix is read when matching a path's variants (``/openapi.json`` as ``/openapi``)."""
    path = path[:-1] if len(path) > 1 and path.endswith("/") else path
    head, _, last = path.rpartition("/")
    at = last.find(".", 1)
    return f"{head}/{last[:at]}" if at > 0 else path


def build_input(call: PolicyCall) -> dict[str, Any]:
    """The one input document (see ``docs/policy.md``). Fresh containers, safe to hand out."""
    agents = list(call.chain.agents)
    return {
        "tool": call.tool,
        "resource": call.resource,
        "method": call.method.upper(),
        "path": call.path,
        "path_loose": loose_path(call.path),
        "tenant": call.tenant,
        "env": call.env,
        "agent": {
            "id": call.agent.id,
            "roles": list(call.agent.roles),
            "attributes": dict(call.agent.attributes),
            "version": call.agent.version,
            "owner": call.agent.owner,
        },
        "token": {"scopes": list(call.scopes), "client_id": call.client_id, "jti": call.jti},
        "auth": {"method": call.auth_method},
        "chain": {
            "agents": agents,
            "parent": agents[-1] if agents else None,
            "depth": len(agents),
            "origin_user": call.chain.origin_user,
            "origin_iss": call.chain.origin_iss,
        },
        "request": {
            "body": call.body,
            "query": {k: v if isinstance(v, str) else list(v) for k, v in call.query.items()},
            "headers": {
                k.lower(): v for k, v in call.headers.items() if k.lower() not in CREDENTIAL_HEADERS
            },
        },
        "time": {"unix": math.floor(call.time)},
    }


def _str_tuple(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"call field {key!r} must be a list of strings")
    return tuple(value)


def _opt_str(data: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = data.get(key, default)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"call field {key!r} must be a string")
    return value


def _mapping(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise InvalidRequest(f"call field {key!r} must be an object")
    return value


_CALL_FIELDS: Final = frozenset(
    {"tool", "resource", "method", "path", "tenant", "env", "agent", "scopes", "client_id", "jti"}
    | {"auth_method", "chain", "body", "query", "headers", "time"}
)


def call_from_dict(data: Mapping[str, Any]) -> PolicyCall:
    """A :class:`PolicyCall` from JSON (policy tests, ``aegis policy eval``, the dry-run API).

    Unknown fields are refused so that a misspelt field in a test never silently goes untested.
    """
    unknown = sorted(set(data) - _CALL_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown call field(s) {', '.join(unknown)}; see docs/policy.md")
    agent = _mapping(data, "agent")
    chain = _mapping(data, "chain")
    when = data.get("time", 0)
    if not isinstance(when, int | float) or isinstance(when, bool) or not math.isfinite(when):
        raise InvalidRequest("call field 'time' must be unix seconds")
    auth = data.get("auth_method", "mtls")
    if auth not in _AUTH_METHODS:
        raise InvalidRequest(f"call field 'auth_method' must be one of {', '.join(_AUTH_METHODS)}")
    tool = _opt_str(data, "tool")
    if not tool:
        raise InvalidRequest("call field 'tool' is required")
    return PolicyCall(
        tool=tool,
        resource=_opt_str(data, "resource"),
        method=_opt_str(data, "method", "POST") or "POST",
        path=_opt_str(data, "path", "/") or "/",
        tenant=_opt_str(data, "tenant", "default") or "default",
        env=_opt_str(data, "env", "prod") or "prod",
        agent=AgentInfo(
            id=_opt_str(agent, "id", "agent") or "agent",
            roles=_str_tuple(agent, "roles"),
            attributes=_mapping(agent, "attributes"),
            version=_opt_str(agent, "version"),
            owner=_opt_str(agent, "owner"),
        ),
        scopes=_str_tuple(data, "scopes"),
        client_id=_opt_str(data, "client_id"),
        jti=_opt_str(data, "jti"),
        auth_method=auth,
        chain=ChainInfo(
            agents=_str_tuple(chain, "agents"),
            origin_user=_opt_str(chain, "origin_user"),
            origin_iss=_opt_str(chain, "origin_iss"),
        ),
        body=data.get("body"),
        query=_mapping(data, "query"),
        headers={str(k): str(v) for k, v in _mapping(data, "headers").items()},
        time=float(when),
    )
