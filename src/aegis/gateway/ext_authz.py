"""What the ext_authz front doors share (Envoy ext_authz v3, nginx ``auth_request``): one checked
request in, one pipeline :class:`~aegis.gateway.evidence.Result` out.

An ext_authz door never sees the upstream; it tells a proxy (Envoy, nginx) to forward or to answer
a refusal. Each door only translates its protocol into a :class:`CheckedRequest`; this module then
does what the reverse proxy does before deciding: vet the path, choose the route with the same
:class:`~aegis.gateway.routing.RouteTable`, bound the body, validate a forwarded client certificate
and build the :class:`~aegis.gateway.context.CallContext` for :meth:`Pipeline.run`.

Facts a proxy forwards about the original request (its client certificate, scheme, host, and for
nginx its URI and method) are believed only from a configured trusted proxy address; the door
checks the address and passes ``None`` otherwise. A certificate *header* is read only when
``xfcc_mode`` (``pki.xfcc_mode``) says that proxy sets it: nginx passes every header of the
client on to an ``auth_request`` subrequest, so a header the proxy does not overwrite is the
caller's, and a certificate is public data. The host and scheme are refused (400
``invalid_request``) unless they are an RFC 3986 ``host [":" port]`` and ``http``/``https``,
before any route is chosen: the URL built from them is what a DPoP proof's ``htu`` is compared
with, and a host holding ``/``, ``?``, ``#`` or ``@`` would move the compared path away from the
routed one.

Policy sees the fields the reverse proxy would show it: the host decided on as ``host`` (gRPC
carries it only as ``:authority``; an nginx subrequest's own Host is nginx's), none of the caller's
claims about proxies (``Forwarded``, ``X-Real-IP``, ``X-Forwarded-*``: it can send any), and the
door's own ``X-Forwarded-For`` (the client, only as a trusted proxy reported it), ``-Proto`` and
``-Host`` from the scheme and host it decided on. Behind Envoy, the claims Envoy does not set
itself are named for removal before the upstream. A request carrying ``Upgrade`` is refused
first: once the proxy in front switched protocols (a WebSocket), no later message would be
decided.

A body the door did not see whole is marked ``streamed``, so that a policy that reads bodies
refuses the call instead of deciding without it. Sanitize decisions cannot be applied here (no
body rewriting through a check), so contexts are built with ``can_sanitize=False`` and the
pipeline refuses them with ``policy_error``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import unquote

from aegis.approvals.model import is_bound
from aegis.config import GatewaySettings
from aegis.errors import AegisError, InvalidRequest, spec_for
from aegis.gateway.context import (
    EMPTY_BODY_DIGEST,
    METHODS,
    STREAMED_BODY_DIGEST,
    CallContext,
    Route,
    body_digest,
)
from aegis.gateway.evidence import Result
from aegis.gateway.fields import UPGRADE_REFUSED, parse_json_body, proxy_claim, vet_fields
from aegis.gateway.mcp import MCP_METHODS, mcp_call
from aegis.gateway.overrides import refuse_method_override
from aegis.gateway.pipeline import Pipeline
from aegis.gateway.routing import RouteTable
from aegis.gateway.target import vet_path, vet_query
from aegis.pki.forwarded import parse_nginx, parse_xfcc
from aegis.pki.middleware import audit_refusal
from aegis.pki.peer import PeerIdentity, PeerValidator
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import MTLS_REJECTIONS, count_forward_failure

__all__ = [
    "CREDENTIAL_HEADERS",
    "Asked",
    "CheckedRequest",
    "ExtAuthz",
    "TrustedPeers",
    "XfccMode",
    "refusal_body",
    "removed_upstream",
    "vet_authority",
    "withheld_from_upstream",
]

#: Request headers a proxy should remove before forwarding an allowed call: the credentials were
#: for the gateway, and ``x-aegis-*`` identity fields upstream must come only from the decision.
CREDENTIAL_HEADERS: Final = ("authorization", "dpop")
_MAX_REMEMBERED_PEERS: Final = 4096
#: The only schemes a checked request may have been made with.
_SCHEMES: Final = frozenset({"http", "https"})
#: RFC 3986 §3.2.2 ``host``: a reg-name (which covers an IPv4 address) of unreserved and
#: sub-delims characters, or an IP-literal in brackets; then §3.2.3 ``[":" port]``, here one to
#: five digits. Nothing else (``/``, ``?``, ``#``, ``@``, spaces) may sit in an authority. The
#: pct-encoded characters RFC 3986 also allows in a reg-name are refused: ``%61dmin.example.com``
#: is ``admin.example.com`` to a URL parser (§6.2.2.2, WHATWG) but another host to host rules and
#: routes, and no client needs to send one.
_AUTHORITY: Final = re.compile(
    r"(?P<host>[A-Za-z0-9\-._~!$&'()*+,;=]+"
    r"|\[(?P<ip6>[0-9A-Fa-f:.]+)\]"
    r"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_MAX_PORT: Final = 65535

#: Which proxy sets a forwarded client certificate header (``pki.xfcc_mode``); ``none``: none does.
XfccMode = Literal["none", "envoy", "nginx"]


#: Forwarding fields Envoy's HttpConnectionManager sets itself before any filter runs
#: (``X-Forwarded-For``, ``-Proto``, ``-Port`` with ``append_x_forwarded_port``, and
#: ``X-Forwarded-Client-Cert`` with ``forward_client_cert_details``): never asked to be removed.
_ENVOY_SETS: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-client-cert"}
)


def withheld_from_upstream(name: str) -> bool:
    """Whether an incoming request header (lowercase name) must be removed before an allowed call
    goes upstream behind Envoy: the credentials, every ``x-aegis-*`` field however spelled, and
    every forwarding claim Envoy does not set itself (``Forwarded``, ``X-Real-IP``,
    ``X-Forwarded-Host``, underscore spellings ...). CGI and WSGI servers read
    ``X_Aegis_Agent_Id`` as the same variable as ``X-Aegis-Agent-Id``, and Envoy passes names with
    underscores by default, so a client's underscored copy would stand beside the identity the
    decision sets; a client's ``X-Real-IP`` would be an address policy never saw (the reverse
    proxy drops them the same way)."""
    norm = name.replace("_", "-")
    return (
        name in CREDENTIAL_HEADERS
        or norm.startswith(("x-aegis-", "proxy-"))
        or norm == "proxy"  # HTTP_PROXY to a CGI upstream ("httpoxy")
        or (proxy_claim(name) and name not in _ENVOY_SETS)
    )


#: Fields of the transport a proxy sets or checks itself: never asked to be removed.
_TRANSPORT: Final = frozenset(
    {"host", "content-length", "connection", "keep-alive", "te", "transfer-encoding", "upgrade"}
)


def removed_upstream(names: Iterable[str], result: Result) -> list[str]:
    """The incoming request fields (lowercase ``names``) a proxy must remove before an allowed
    call goes upstream: those :func:`withheld_from_upstream`, and on a call that passes with an
    approval's override every field the approval is not bound to (tracing, ``x-envoy-*``,
    ``baggage`` ...), which could otherwise be changed after the human approved the call. The
    fields the answer sets itself are replaced, not removed."""
    drop = {
        n
        for n in names
        if withheld_from_upstream(n)
        or (
            result.approved
            and not is_bound(n)
            and n not in _TRANSPORT
            and n not in _ENVOY_SETS
            and not n.startswith(":")
        )
    }
    return sorted(drop - set(result.upstream_headers))


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """The original request, as a proxy described it to an ext_authz door."""

    method: str
    #: The request target as sent (percent-encoded path, optional ``?query``).
    target: str
    host: str
    scheme: str
    #: ``(lowercase name, value)`` pairs of the original request, repeats kept.
    headers: tuple[tuple[str, str], ...]
    #: The whole body; None when the original may carry a body the door was not shown whole.
    body: bytes | None
    #: The client certificate forwarded by a trusted proxy, as forwarded (not yet parsed or
    #: validated): a URL-encoded PEM (Envoy ``source.certificate``, nginx
    #: ``$ssl_client_escaped_cert``) or an Envoy ``x-forwarded-client-cert`` value.
    certificate: str | None = None
    certificate_format: Literal["pem", "xfcc"] = "pem"
    #: The original client's address, when known.
    client: str | None = None
    #: The scheme of the connection the original request came on, as a trusted proxy reported it
    #: in its own ``X-Forwarded-Proto`` when ``scheme`` may be the client's word (Envoy's gRPC
    #: ``http.scheme`` is the client's ``:scheme`` on HTTP/2 and HTTP/3): what policy is shown
    #: as ``x-forwarded-proto``, ``scheme`` when None.
    forwarded_proto: str | None = None
    #: Whether a field sent more than once arrived as one value joined with ``,`` (Envoy's
    #: ``headers`` map, without ``encode_raw_headers``): a comma may then separate repeats.
    fields_joined: bool = False
    #: Why the door refuses the request before anything is decided (400 ``invalid_request``),
    #: for what only its protocol shows: refused, audited and counted as every refusal is.
    refused: str | None = None


class TrustedPeers:
    """Immediate peer addresses whose forwarded request facts are believed."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self._trusted = frozenset(ipaddress.ip_address(a) for a in addresses)
        #: Answers by the exact text asked about (a pure function of it; bounded): a proxy keeps
        #: its connections open, so the same few peer addresses are asked about on every call.
        self._answers: dict[str, bool] = {}

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        answer = self._answers.get(host)
        if answer is None:
            if len(self._answers) >= _MAX_REMEMBERED_PEERS:
                self._answers.clear()
            answer = self._answers[host] = self._trusts(host)
        return answer

    def _trusts(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False  # a unix socket or a name: never trusted
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr in self._trusted


def refusal_body(result: Result) -> dict[str, Any]:
    """The JSON body of a refusal: the stable ``code``, the ``message``, the ``decision_id`` (null
    when nothing was decided), the OAuth-style ``error`` / ``error_description`` pair, and the
    details a refusal repeats to the caller (the ``approval_id`` of an ``approval_needed``)."""
    return {
        "code": result.code,
        "message": result.message,
        "decision_id": result.decision_id or None,
        "error": spec_for(result.code or "server_error").oauth_error,
        "error_description": result.message,
        **result.details,
    }


def vet_authority(host: str, scheme: str) -> None:
    """Refuse (``invalid_request``) a host that is not RFC 3986 ``host [":" port]`` and a scheme
    other than ``http``/``https``.

    The pipeline compares a DPoP proof's ``htu`` (RFC 9449 §4.3) with a URL built from these and
    parsed again; a host such as ``gw.example.com/payments/charge#`` would make that comparison
    read a path the call was neither routed nor forwarded by. A ``,`` (an RFC 3986 sub-delim) is
    refused too: the host is passed on as ``X-Forwarded-Host``, a list to its readers (Express
    reads ``admin.example.com,x`` as ``admin.example.com``), while routes compare it whole.
    """
    if scheme.lower() not in _SCHEMES:
        raise InvalidRequest("the request scheme must be http or https")
    if "," in host:
        raise InvalidRequest("the request host must be one host, without ','")
    if "%" in host:
        raise InvalidRequest(
            "the request host must not be percent-encoded: a URL parser reads %61dmin as admin, "
            "host rules and routes would not"
        )
    m = _AUTHORITY.fullmatch(host)
    if m is None:
        raise InvalidRequest("the request host must be an RFC 3986 host with an optional port")
    if m["port"] is not None and int(m["port"]) > _MAX_PORT:
        raise InvalidRequest(f"the request port must be at most {_MAX_PORT}")
    if m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            raise InvalidRequest("the request host is not a valid ipv6 literal") from None


def _as_the_proxy_shows(
    headers: tuple[tuple[str, str], ...], req: CheckedRequest
) -> tuple[tuple[str, str], ...]:
    """The fields policy sees, as the reverse proxy shows them: the host the door decided on as
    ``host`` (gRPC carries it only as ``:authority``, an nginx subrequest's own Host is nginx's),
    no claim of the caller's about proxies (``Forwarded``, ``X-Real-IP``, ``X-Forwarded-*``,
    which it could set to anything), and the door's own ``X-Forwarded-For`` (the client only as
    a trusted proxy reported it), ``-Proto`` (the connection's scheme as a trusted proxy reported
    it, else the scheme decided on) and ``-Host`` from what it decided on."""
    kept = tuple((k, v) for k, v in headers if k != "host" and not proxy_claim(k))
    own: tuple[tuple[str, str], ...] = (("x-forwarded-for", req.client),) if req.client else ()
    proto = req.forwarded_proto or req.scheme.lower()
    own += (("x-forwarded-proto", proto), ("x-forwarded-host", req.host))
    return (("host", req.host), *kept, *own)


@dataclass(frozen=True, slots=True)
class Asked:
    """What a door was asked, as far as it read it: for the record of a refusal before any
    route was chosen."""

    method: str
    target: str
    host: str
    client: str | None
    #: The request's first ``Authorization`` (the refusal is marked for it).
    authorization: str | None = None


class ExtAuthz:
    """Decide one checked request with the pipeline, exactly as the reverse proxy would."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: GatewaySettings,
        *,
        validator: PeerValidator | None = None,
        xfcc_mode: XfccMode = "none",
        xfcc_header: str = "",
    ) -> None:
        self._pipeline, self._settings, self._validator = pipeline, settings, validator
        #: ``pki.xfcc_mode``: which proxy, if any, sets a forwarded certificate header. The
        #: default believes no such header: an unset mode must never let a caller name a
        #: certificate.
        self.xfcc_mode: XfccMode = xfcc_mode
        #: ``pki.xfcc_header``: the header that proxy sets the certificate in, when not its
        #: default (``x-forwarded-client-cert`` for Envoy, ``x-ssl-client-cert`` for nginx). Only
        #: that one is read: every other name reaches the door as the client sent it.
        self.xfcc_header = xfcc_header.lower()
        self.routes = RouteTable(settings.routes)

    @property
    def max_body_bytes(self) -> int:
        return self._settings.max_body_bytes

    def _read_alike(
        self, host: str, raw_path: str, path: str, route: Route
    ) -> InvalidRequest | None:
        """Why the proxy in front may send the call to another route's upstream than ``route``
        (chosen on the path as upstreams read it), or None. Envoy compares the path as sent,
        percent-encoded, and case-sensitively; nginx compares it decoded, case-sensitively. Both
        must land on ``route``: ``/PUBLIC/x``, ``/public;v=1/x`` or ``/p%75blic/x`` under a
        catch-all route would be decided as ``/public`` and served by the catch-all's upstream."""
        for reading in (path, raw_path):
            exact = self.routes.match_exact(host, reading)
            if exact is not route:
                there = "no route" if exact is None else f"the route {exact.path_prefix!r}"
                return InvalidRequest(
                    f"the path falls under {there} as the proxy in front compares it "
                    f"(exactly, case-sensitively) but under the route {route.path_prefix!r} as "
                    "upstreams read it (case-folded, without ';' parameters or trailing dots, "
                    "percent-decoded); send the path as that route spells it"
                )
        return None

    async def undecided(self, status: int, code: str, message: str, asked: Asked) -> Result:
        """A refusal before any route (so no tool, no policy, no attestation): counted and
        audited by the pipeline as ``gateway.refused``."""
        return await self._pipeline.refuse_unrouted(
            door="ext_authz", method=asked.method, target=asked.target, host=asked.host,
            client=asked.client, status=status, code=code, message=message,
            authorization=asked.authorization,
        )  # fmt: skip

    async def undelivered(self, req: CheckedRequest, result: Result) -> None:
        """Record (``gateway.forward_failed``, code ``answer_not_delivered``) and count that the
        answer to a decided call never reached the proxy: it stopped waiting (its ext_authz
        timeout) and applied its own failure mode, so the decision record alone, an allow
        perhaps, would not say what happened to the call."""
        code, path = "answer_not_delivered", req.target.split("?", 1)[0]
        try:
            route = self.routes.match(req.host, unquote(path))
        except ValueError:
            route = None
        count_forward_failure(route.tool if route is not None else "", code)
        audit = self._pipeline.audit
        if audit is None:
            return
        record = {
            "decision_id": result.decision_id, "time": self._pipeline.now(),
            "tool": route.tool if route is not None else None, "action": result.action,
            "method": req.method[:16], "path": path[:512], "code": code,
            "reason": "the proxy stopped waiting for the answer and applied its own failure mode",
        }  # fmt: skip
        try:
            await audit.append_async("gateway.forward_failed", record)
        except AegisError as exc:
            log_event("gateway.audit_failed", level=logging.ERROR, code=exc.code,
                      decision_id=result.decision_id)  # fmt: skip

    async def check(self, req: CheckedRequest) -> Result:
        sent = next((v for k, v in req.headers if k == "authorization"), None)
        seen = Asked(req.method, req.target, req.host, req.client, sent)
        if req.refused is not None:
            return await self.undecided(400, "invalid_request", req.refused, seen)
        if any(name == "upgrade" for name, _ in req.headers):
            # Allowed, the proxy in front would switch protocols (a WebSocket) and pass every
            # later message on without a decision; the reverse proxy refuses it alike.
            return await self.undecided(400, "invalid_request", UPGRADE_REFUSED, seen)
        # The host and scheme first, before they choose a route or enter the URL htu is checked on.
        # Exactly as sent, as the reverse proxy answers it: methods are case-sensitive (RFC 9110
        # §9.1), and the proxy in front forwards "get" as it came, to an upstream that may read
        # it otherwise than the GET a decision upper-cased would describe.
        if req.method not in METHODS:
            refused = await self.undecided(
                405, "method_not_allowed", f"method not allowed; use one of {', '.join(METHODS)}",
                seen,
            )  # fmt: skip
            refused.headers["allow"] = ", ".join(METHODS)
            return refused
        try:
            vet_authority(req.host, req.scheme)
        except InvalidRequest as exc:
            return await self.undecided(400, "invalid_request", exc.message, seen)
        # Split by hand, never with urlsplit: a target such as ``//admin/payments/x`` would be read
        # as host ``admin`` and path ``/payments/x`` there, while the upstream serves it as a path.
        # Only origin-form targets are decided (vet_path refuses anything not starting with '/').
        raw_path, _, query = req.target.partition("?")
        path, bad = raw_path, None
        params: tuple[tuple[str, str], ...] = ()
        try:
            path = vet_path(raw_path)
            # As the reverse proxy refuses them: '#', an unencoded ';', control characters.
            params = vet_query(query)
        except InvalidRequest as exc:
            bad = exc
        route = self.routes.match(req.host, path)
        if route is not None and bad is None:
            bad = self._read_alike(req.host, raw_path, path, route)
        if route is not None and bad is None:
            clash = self.routes.clash(req.host, path, route)
            if clash is not None:
                bad = InvalidRequest(
                    f"the path begins with the route prefix {clash!r} without being under it; "
                    "the proxy in front may send it to that route's upstream (use Envoy's "
                    "path_separated_prefix, or nginx locations ending in '/')"
                )
        if route is not None and bad is None:
            other = self.routes.read_as_another(req.host, path, route)
            bad = InvalidRequest(other) if other else None
        if route is None:
            if bad is not None:
                return await self.undecided(400, "invalid_request", bad.message, seen)
            return await self.undecided(404, "not_found", "no route for this path", seen)
        # As the proxy reads them: a repeated Content-Type or Content-Encoding, or one named in
        # Connection, is refused; fields Connection names are not shown to policy.
        try:
            headers, _ = vet_fields(req.headers)
        except InvalidRequest as exc:
            headers, bad = req.headers, bad or exc
        facts: dict[str, Any] = {
            "method": req.method,
            "url": f"{req.scheme.lower()}://{req.host}{req.target}",
            "host": req.host,
            "path": path,
            "route": route,
            "headers": _as_the_proxy_shows(headers, req),
            "query": params,
            "body_digest": STREAMED_BODY_DIGEST,
            "raw_body": None,
            "client": req.client,
            "can_sanitize": False,
            "fields_joined": req.fields_joined,
            "door": "ext_authz",
        }
        try:
            if bad is not None:
                raise bad
            self._body_facts(facts, req.body)
            if req.certificate:
                facts["peer"] = await self._peer(req)
        except AegisError as exc:
            refused = await self._pipeline.refuse(CallContext(**facts), exc)
            if exc.code == "method_not_allowed" and route.mcp:  # RFC 9110 §15.5.6
                refused.headers["allow"] = ", ".join(MCP_METHODS)
            return refused
        return await self._pipeline.run(CallContext(**facts))

    def _body_facts(self, facts: dict[str, Any], raw: bytes | None) -> None:
        """Body fields of the context for a body seen whole (``raw``); a body not seen whole
        (None) keeps the digest ``streamed`` and stays hidden from policy. On an MCP route the
        call is decided under the tool its message acts on (a POST not shown whole is refused)."""
        limit = self._settings.max_body_bytes
        if raw is not None and len(raw) > limit:
            raise AegisError(f"request body larger than {limit} bytes", code="payload_too_large")
        if raw is not None:
            # Named before anything can refuse the body (a repeated member, a _method override,
            # an MCP message): the refusal's evidence is of the body it refused.
            facts["body_digest"] = body_digest(raw) if raw else EMPTY_BODY_DIGEST
        message = None
        if facts["route"].mcp:
            facts["route"], message = mcp_call(
                facts["route"], facts["method"], facts["headers"], raw, facts["query"]
            )
        if raw is None:
            return
        fields = facts["headers"]
        content_type = next((v for k, v in fields if k == "content-type"), None)
        coding = next((v for k, v in fields if k == "content-encoding"), None)
        refuse_method_override(facts["method"], content_type, raw, coding)
        reads = self._pipeline.reads_body(facts["route"])
        strict = reads and self._pipeline.reads_body(facts["route"], enforced=True)
        # An MCP message is always shown, as at the reverse proxy.
        shown = limit if reads or facts["route"].mcp else self._settings.policy_body_bytes
        small = len(raw) <= shown
        if message is not None and not strict:
            facts["body"] = message.body  # parsed alike once (a strict read checks integers too)
        elif small:
            facts["body"] = parse_json_body(raw, content_type, coding, safe_integers=strict)
        facts["raw_body"] = raw if small else None
        facts["integers_checked"] = strict

    async def _peer(self, req: CheckedRequest) -> PeerIdentity | None:
        text = req.certificate or ""
        try:
            # A forwarded value that does not parse is refused as a certificate that does not
            # validate is: counted and recorded as an mTLS refusal, not only as the call's.
            der = parse_xfcc(text) if req.certificate_format == "xfcc" else parse_nginx(text)
            # Without the internal CA no certificate can be validated; the peer stays unknown,
            # so a certificate-bound token fails its binding check (closed), while DPoP calls
            # still work.
            if der is None or self._validator is None:
                return None
            return await self._validator.validate_async(der, source="forwarded")
        except AegisError as exc:
            # Counted and recorded as every refused certificate is (mtls.rejected), besides the
            # refusal of the call itself.
            MTLS_REJECTIONS.labels(listener="ext_authz", code=exc.code).inc()
            audit = self._pipeline.audit
            await audit_refusal(audit.append_async if audit is not None else None, {
                "listener": "ext_authz", "stage": "peer_certificate", "code": exc.code,
                "reason": exc.message, "certificate_source": "forwarded", "client": req.client,
                "method": req.method[:16], "path": req.target.split("?", 1)[0][:512],
                **{k: exc.details.get(k) for k in ("serial", "spiffe_id")},
            })  # fmt: skip
            raise
