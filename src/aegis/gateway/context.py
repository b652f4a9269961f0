"""The call context (RFC 9110 request semantics): what every front door hands the decision pipeline.

A front door (reverse proxy, ext_authz, MCP proxy) translates its protocol into one
:class:`CallContext` and nothing else; the pipeline never looks at a framework request. Headers are
kept as an ordered list of ``(lowercase name, value)`` pairs, because how many times a header occurs
is itself checked (two ``Authorization`` or two ``DPoP`` headers are refused). The peer identity is
set only from a verified certificate (``aegis.pki.middleware``), never from client input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final

from aegis.config import GatewayRoute
from aegis.gateway.fields import is_encoded, is_json_type
from aegis.gateway.overrides import body_field_names
from aegis.pki.peer import PeerIdentity

__all__ = [
    "EMPTY_BODY_DIGEST",
    "METHODS",
    "STREAMED_BODY_DIGEST",
    "CallContext",
    "Route",
    "body_digest",
    "route_from_settings",
]

#: Methods a call may use at every front door (the proxy forwards them, ext_authz decides them);
#: anything else is answered 405 before any route is chosen.
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: ``sha256:`` digest of an empty body.
EMPTY_BODY_DIGEST: Final = "sha256:" + hashlib.sha256(b"").hexdigest()
#: The body digest of a call whose body is streamed to the upstream without being buffered.
STREAMED_BODY_DIGEST: Final = "streamed"


def body_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class Route:
    """Where a call goes and what it is, from configuration (never from the request)."""

    path_prefix: str
    upstream: str
    tool: str
    tenant: str
    env: str
    host: str | None = None
    allow_bearer: bool = False
    #: An audience the token must carry for this route, besides the gateway's own.
    audience: str | None = None
    #: Calls without a verified peer certificate are refused (``cert_required``).
    require_client_cert: bool = False
    #: The SPIFFE ID an ``https`` upstream's certificate must name (None: any the CA issued).
    upstream_spiffe_id: str | None = None
    #: The key the upstream files a JSON body's members under (Rails ``wrap_parameters``).
    wrap_parameters: str | None = None
    #: An MCP server's endpoint: calls are decided message by message (``aegis.gateway.mcp``).
    mcp: bool = False
    #: Accept tool arguments that are strings of JSON text (refused otherwise: ``aegis.gateway.mcp``).
    mcp_json_text_arguments: bool = False
    #: For a call decided as one MCP tool (``<tool>.<name>``), the route's configured tool.
    base_tool: str | None = None

    @property
    def metric_tool(self) -> str:
        """The tool metrics are labelled with: the configured one, never a name from a request
        (an MCP tool's name would let callers grow the label sets without bound)."""
        return self.base_tool or self.tool


def route_from_settings(r: GatewayRoute) -> Route:
    return Route(
        r.path_prefix, r.upstream, r.tool, r.tenant, r.env, r.host, r.allow_bearer, r.audience,
        r.require_client_cert, r.upstream_spiffe_id, r.wrap_parameters, r.mcp,
        r.mcp_json_text_arguments,
    )  # fmt: skip


_HOST_FIELDS: Final = frozenset({"host", "x-forwarded-host"})


def _canonical_host(value: str) -> str:
    """``host[:port]`` as routes compare it: lowercase, without port or the trailing dot of an
    absolute DNS name (an IPv6 literal keeps its brackets)."""
    if value.startswith("["):
        literal, bracket, _ = value.partition("]")
        return f"{literal}]".lower() if bracket else value.lower()
    name, colon, port = value.rpartition(":")
    if colon and port.isascii() and port.isdigit():
        value = name
    return value.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class CallContext:
    """One call, as the pipeline sees it."""

    method: str
    #: The absolute URL the client addressed (scheme, host, path, query): DPoP ``htu`` is
    #: compared with it, and it is part of the request digest.
    url: str
    #: The Host header value (or the configured public host).
    host: str
    path: str
    route: Route
    #: ``(lowercase name, value)`` pairs in arrival order, repeats kept.
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    #: ``sha256:<hex>`` of the whole body, or :data:`STREAMED_BODY_DIGEST`.
    body_digest: str = EMPTY_BODY_DIGEST
    #: The parsed JSON body when it was small enough to buffer, else None.
    body: Any = None
    #: The raw buffered body (None when streamed).
    raw_body: bytes | None = b""
    #: Set only from a certificate validated by the PKI layer.
    peer: PeerIdentity | None = None
    client: str | None = None
    #: Whether the front door can apply sanitize obligations (rewrite the body, headers and the
    #: answer). An ext_authz door only answers allow or deny, so a sanitize decision with
    #: obligations is refused there (``policy_error``) rather than forwarded unsanitized.
    can_sanitize: bool = True
    #: Whether a field sent more than once may have arrived as one value joined with ``,``
    #: (Envoy's gRPC ``headers`` map): policy then cannot tell one value from several.
    fields_joined: bool = False
    #: Whether the door read the body refusing integers beyond +-2**53 (the policy in force then
    #: read bodies); else policy checks it once it decides (a policy activated meanwhile).
    integers_checked: bool = False
    #: Whether the door relays the upstream's answers, and so holds the MCP session an
    #: ``initialize`` answer hands out (the reverse proxy): a call naming a session nobody holds
    #: is then refused as for one that does not exist, and takes no hold.
    sees_answers: bool = False
    #: The front door the call came by, as its mTLS refusals are counted (``listener``).
    door: str = "gateway"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def body_hidden(self) -> bool:
        """The call has a body that policy does not see as JSON (streamed, over the buffering
        limit, or of another content type)."""
        if self.body_digest == EMPTY_BODY_DIGEST:
            return False
        if self.raw_body is None:
            return True
        ctype = coding = None
        for k, v in self.headers:  # the first of each, in one pass
            if k == "content-type" and ctype is None:
                ctype = v
            elif k == "content-encoding" and coding is None:
                coding = v
        return not is_json_type(ctype) or is_encoded(coding)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in arrival order."""
        lname = name.lower()
        return [v for k, v in self.headers if k == lname]

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k == lname), None)

    def policy_headers(self) -> dict[str, str]:
        """Single-valued view for the policy input (repeats joined by ``, `` per RFC 9110 §5.3);
        credentials are removed again by ``build_input``. ``host`` and ``x-forwarded-host`` are
        shown as routes compare them, lowercase and without port or trailing dot (RFC 3986
        §3.2.2: ``ADMIN.example.com.:443`` is admin.example.com), so that a rule on them holds
        for every spelling of the host."""
        values: dict[str, list[str]] = {}
        for k, v in self.headers:
            values.setdefault(k, []).append(_canonical_host(v) if k in _HOST_FIELDS else v)
        return {k: v[0] if len(v) == 1 else ", ".join(v) for k, v in values.items()}

    def body_names(self) -> frozenset[str] | None:
        """The top-level field names of the body as frameworks that merge body and query read
        them: a JSON object's members, a form's fields; empty for no body or one of another
        type; None for a form, multipart or JSON body the gateway did not read (not held, under
        a content coding, or multipart)."""
        if self.body_digest == EMPTY_BODY_DIGEST:
            return frozenset()
        return body_field_names(
            self.method, self.header("content-type"), self.header("content-encoding"),
            self.body, self.raw_body,
        )  # fmt: skip

    def policy_query(self) -> dict[str, str | list[str]]:
        out: dict[str, str | list[str]] = {}
        for k, v in self.query:
            prev = out.get(k)
            if prev is None:
                out[k] = v
            elif isinstance(prev, list):
                prev.append(v)
            else:
                out[k] = [prev, v]
        return out
