"""Approval requests: the record, its state machine, the call it holds and that call's digest.

States (every arrow is one guarded write, ``UPDATE ... WHERE state = <from>``)::

    recording ──recorded──▶ pending ──approve──▶ approving ──recorded──▶ approved ──used──▶ used
                               │  └──deny──▶ denied ◀──withdraw──────────────────────┤
                               └──expire──▶ expired ◀──override window over─────────┘

``recording`` and ``approving`` hold a change until its audit record is written: a request is
listed as pending (and can be decided) only once ``approval.requested`` is in the log, and an
approval hands out an override only once ``approval.decided`` is. A record that fails moves it
back (``approving`` to ``pending``) or closes it (``recording`` to ``expired``); one left so by a
stopped process is closed after :data:`UNRECORDED_AFTER` seconds.

A request is *open* while in any of the first four states; at most one request is open per call
digest (a unique column holds the digest only while open), so the same call asked again returns the
same id. The digest binds everything the upstream acts on and everything the approval stood for:
the tenant, environment, agent, tool, the host and upstream of the route, method, path, the query
(in order: an upstream may read the first ``to`` of two), the request headers the upstream receives
(:func:`bound_headers`), the body byte for byte (its SHA-256: a payment of 12,001 is another call
than one of 12,000), the delegation chain and origin user (separation of duties is judged on them),
and the approval the policy required (its groups): an override approved by finance does not pass a
call that policy now holds for security.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "APPROVAL_ID",
    "CLOSED_STATES",
    "MAX_SHOWN_FIELDS",
    "OPEN_STATES",
    "REDACTED",
    "UNRECORDED_AFTER",
    "UNRECORDED_STATES",
    "ApprovalRequest",
    "HeldCall",
    "State",
    "bound_headers",
    "call_digest",
    "is_bound",
    "is_secret_name",
    "redact_fields",
    "redact_parameters",
]

State = Literal["recording", "pending", "approving", "approved", "denied", "expired", "used"]
OPEN_STATES: Final[tuple[State, ...]] = ("recording", "pending", "approving", "approved")
#: States shown to the agent as ``pending``: the change is not on record yet.
UNRECORDED_STATES: Final[tuple[State, ...]] = ("recording", "approving")
#: Seconds after which a request still ``recording`` or ``approving`` is closed (``expired``):
#: the process writing its record stopped before it could move it on.
UNRECORDED_AFTER: Final = 300.0
CLOSED_STATES: Final[tuple[State, ...]] = ("denied", "expired", "used")
REDACTED: Final = "[redacted]"
#: Names (body keys, query parameters, headers) whose values approvers never see: any that
#: contains one of these, lowercase ...
_SECRET_PARTS: Final = (
    "password", "passwd", "secret", "token", "authorization", "cookie", "credential", "apikey",
    "signature", "assertion", "hmac", "cvv", "cvc", "sessionid", "privatekey", "privkey",
    "passphrase", "passcode", "pincode", "accesskey", "authenticat", "mnemonic", "seedphrase",
    "recoveryphrase",
)  # fmt: skip
#: ... or has one of these as a word (split at punctuation and case changes: ``X-Api-Key``,
#: ``api_key``, ``sessionId``, ``SAMLResponse``), so that ``author`` or ``keyword`` stay shown.
_SECRET_WORDS: Final = frozenset(
    {"key", "sig", "auth", "session", "sid", "jwt", "pwd", "pass", "pin", "otp", "card", "saml",
     "csrf", "xsrf", "nonce", "seed"}
)  # fmt: skip
_WORDS: Final = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_MAX_SHOWN: Final = 4096
_MAX_DEPTH: Final = 8


@dataclass(frozen=True, slots=True)
class HeldCall:
    """One call that policy holds for a human, as the gateway saw it (all verified facts)."""

    decision_id: str
    tenant: str
    env: str
    agent_id: str
    #: The accountable human of the agent (registry ``owner``), for separation of duties.
    agent_owner: str
    tool: str
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    #: ``sha256:<hex>`` of the raw body (``streamed`` cannot be bound and is refused).
    body_digest: str
    #: The parsed JSON body (for the redacted view), or None.
    body: Any
    chain: tuple[str, ...] = ()
    #: The user the chain acts for and the issuer of that user's token: ``sub`` values of two
    #: issuers are two users.
    origin_user: str | None = None
    origin_iss: str | None = None
    rule_ids: tuple[str, ...] = ()
    policy_version: str | None = None
    reasons: tuple[str, ...] = ()
    #: The host the call addressed (lowercase, no port: shown to approvers) and the upstream its
    #: route forwards to.
    host: str = ""
    #: The ``Host`` exactly as sent (the upstream receives it as ``X-Forwarded-Host``) and the
    #: request target exactly as sent (percent-encoded path and query), which the upstream
    #: receives byte for byte: ``%3B`` and ``;`` decode alike, and Tomcat reads only ``;`` as
    #: the start of path parameters.
    authority: str = ""
    target: str = ""
    upstream: str = ""
    #: :func:`bound_headers` of the call, in arrival order.
    headers: tuple[tuple[str, str], ...] = ()
    #: The approval the policy required (its groups, comma-separated).
    approval: str = ""
    #: The accountable humans of the agents in ``chain`` (separation of duties); not digested,
    #: the chain itself is.
    chain_owners: tuple[str, ...] = ()


#: Request fields that differ between two sendings of the same call, or that the upstream never
#: receives: credentials, the override itself, tracing ids, transport and proxy fields.
_UNBOUND: Final = frozenset(
    {"authorization", "dpop", "host", "content-length", "connection", "keep-alive", "te",
     "transfer-encoding", "upgrade", "user-agent", "accept-encoding", "date", "traceparent",
     "tracestate", "baggage", "x-request-id", "x-correlation-id", "x-client-trace-id",
     "sentry-trace", "x-amzn-trace-id", "x-cloud-trace-context", "b3", "uber-trace-id",
     "x-ot-span-context", "sw8", "sw8-correlation", "sw8-x", "newrelic",
     "elastic-apm-traceparent", "forwarded", "x-real-ip", "proxy"}
)  # fmt: skip
_UNBOUND_PREFIXES: Final = (
    "x-aegis-", "x-forwarded-", "x-envoy-", "x-b3-", "x-datadog-", "uberctx-", "ot-tracer-",
    "proxy-",
)  # fmt: skip


#: Approval ids as the service mints them (``apr_`` and a URL-safe random part); any other id is
#: unknown without asking the store.
APPROVAL_ID: Final = re.compile(r"apr_[A-Za-z0-9_-]{1,64}")


def is_bound(name: str) -> bool:
    """Whether an approval is bound to the request field ``name`` (see :func:`bound_headers`):
    a field that is not reaches no upstream on a call that passes with an override."""
    norm = name.lower().replace("_", "-")
    return not (norm in _UNBOUND or norm.startswith(_UNBOUND_PREFIXES))


def bound_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The request headers an approval is bound to: every one the upstream acts on, without the
    fields of :data:`_UNBOUND` (names compared with ``_`` read as ``-``), ordered by name. The
    order of different fields is not the caller's to keep (HTTP/2, proxies and Envoy's header
    map reorder them); the order of one field's repeated values is, and a stable sort keeps it.
    So is the order of ``X-Foo`` and ``X_Foo``, sorted as one name: a CGI or WSGI upstream
    reads both as ``HTTP_X_FOO``, and which of them it takes may depend on which came first."""
    out = [(name.lower(), value) for name, value in headers if is_bound(name)]
    return tuple(sorted(out, key=lambda pair: pair[0].replace("_", "-")))


def call_digest(call: HeldCall) -> str:
    """``sha256:<hex>`` over the canonical JSON of what makes the call this call."""
    canonical = {
        "v": 5,
        "tenant": call.tenant,
        "env": call.env,
        "agent": call.agent_id,
        "tool": call.tool,
        "host": call.host.lower(),
        "authority": call.authority,
        "target": call.target,
        "upstream": call.upstream,
        "method": call.method.upper(),
        "path": call.path,
        "query": [[k, v] for k, v in call.query],
        "headers": [[k, v] for k, v in call.headers],
        "body": call.body_digest,
        "chain": list(call.chain),
        "origin_user": call.origin_user,
        "origin_iss": call.origin_iss,
        "approval": call.approval,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_secret_name(name: str) -> bool:
    """Whether a body key, query parameter or header named ``name`` is shown as ``[redacted]``."""
    lower = name.lower()
    if any(part in lower for part in _SECRET_PARTS):
        return True
    return any(w.lower() in _SECRET_WORDS for w in _WORDS.findall(name))


def _redact(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, dict):
        return {
            str(k): REDACTED if is_secret_name(str(k)) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        shown = [_redact(v, depth + 1) for v in value[:100]]
        if len(value) > 100:  # never a silent cut: the approver is told there is more
            shown.append(f"… {len(value) - 100} more items not shown")
        return shown
    return value


def _cut_values(value: Any, limit: int) -> Any:
    """``value`` with every string longer than ``limit`` cut, and marked where it was cut."""
    if isinstance(value, dict):
        return {k: _cut_values(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut_values(v, limit) for v in value]
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… ({len(value) - limit} more characters not shown)"
    return value


#: The query parameters and bound headers approvers are shown, at most: a call carrying more
#: is not held for approval (the gateway refuses it), so every field an approval binds is seen.
MAX_SHOWN_FIELDS: Final = 64
_MAX_FIELDS: Final = MAX_SHOWN_FIELDS
_MAX_FIELD_VALUE: Final = 256


def redact_fields(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """What approvers see of the query or the headers the approval is bound to: every name in
    order, secret-looking values redacted, each value cut at 256 characters and at most 64
    fields (then one ``("…", "<n> more")``). What the approver does not see is still bound: the
    digest covers every field whole."""
    out = []
    for name, value in pairs[:_MAX_FIELDS]:
        if is_secret_name(name):
            value = REDACTED
        elif len(value) > _MAX_FIELD_VALUE:
            value = value[:_MAX_FIELD_VALUE] + "…"
        out.append((name[:_MAX_FIELD_VALUE], value))
    if len(pairs) > _MAX_FIELDS:
        out.append(("…", f"{len(pairs) - _MAX_FIELDS} more"))
    return tuple(out)


def redact_parameters(body: Any) -> Any:
    """What approvers see of the body: secret-looking keys redacted, at most 4 KiB of JSON. A
    larger body is shown with long strings cut (a padding member must not hide the amount
    beside it), then, if still too large, as its top-level members with every string cut short
    and every object or list named but not shown, and ``truncated``."""
    shown = _redact(body, 0)
    if len(json.dumps(shown, default=str)) <= _MAX_SHOWN:
        return shown
    cut = _cut_values(shown, _MAX_FIELD_VALUE)
    if len(json.dumps(cut, default=str)) <= _MAX_SHOWN:
        return cut
    if isinstance(shown, dict):
        brief = {
            k: (f"({type(v).__name__} not shown)" if isinstance(v, dict | list)
                else _cut_values(v, 64))
            for k, v in list(shown.items())[:_MAX_FIELDS]
        }  # fmt: skip
        if len(json.dumps(brief, default=str)) <= _MAX_SHOWN:
            return {"truncated": True, "members": brief}
    return {"truncated": True}


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One stored approval request."""

    id: str
    state: State
    tenant: str
    env: str
    agent_id: str
    agent_owner: str
    tool: str
    method: str
    path: str
    digest: str
    parameters: Any
    rule_ids: tuple[str, ...]
    group: str
    channel: str
    created_at: float
    expires_at: float
    decision_id: str
    chain: tuple[str, ...] = ()
    origin_user: str | None = None
    origin_iss: str | None = None
    policy_version: str | None = None
    reasons: tuple[str, ...] = ()
    decided_at: float | None = None
    decided_by: str | None = None
    decided_via: str | None = None
    decision_reason: str | None = None
    #: Until when an approved request's override token is usable.
    override_expires_at: float | None = None
    #: ``queued``, ``delivered``, ``failed`` or ``no_channel``; attempts and the last error.
    notify_state: str = "queued"
    notify_attempts: int = 0
    notify_error: str | None = None
    #: The query and the bound headers as approvers see them (:func:`redact_fields`).
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    #: Owners of the agents in ``chain``: none of them may decide (separation of duties).
    chain_owners: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        return self.rule_ids[0] if self.rule_ids else "unknown"

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rule_ids"], out["chain"] = list(self.rule_ids), list(self.chain)
        out["reasons"], out["chain_owners"] = list(self.reasons), list(self.chain_owners)
        out["query"] = [list(pair) for pair in self.query]
        out["headers"] = [list(pair) for pair in self.headers]
        out.pop("extra")
        return out
