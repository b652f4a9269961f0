"""Which policy decides a call: the active version for the route's tenant and environment, or the
configured allow-list while none is active (ARCHITECTURE.md, pipeline step 7).

One :class:`~aegis.policy.watcher.PolicyWatcher` per (tenant, env) polls the policy store and swaps
in newly activated versions. Three cases, none of which can turn into an allow by accident:

* a policy is in force: it decides (its evaluator turns any internal failure into a
  ``policy_error`` deny);
* the latest poll reached the store and it answered that no version is active: the allow-list
  decides, default deny (``policy_version = "allowlist"``);
* no policy is loaded and the store has not given that answer (no poll has succeeded yet, the
  first one is under way, or the latest one failed in any way): ``Unavailable(policy_unavailable)``,
  a 503. The allow-list is never a stand-in for a policy Aegis could not read. Once a policy was
  loaded it stays in force through a store outage (it was valid when activated).

A missing ``request.body`` makes every condition on it false (docs/policy.md), so a deny rule on
the body would not fire for a body policy never saw (streamed, too large, or not sent as JSON). When
a rule of the policy in force whose outcome is enforced reads the body of a tool, such a call is
refused (``invalid_request``) instead; what a rule in shadow reads never refuses a call.

The same holds for a field policy reads by name but the upstream may find under another spelling
(:func:`misspelled`): a condition on ``request.body.amount`` is false for ``{"Amount": 20000}``,
which Go's ``encoding/json`` and ASP.NET bind to ``amount``; likewise ``?ACTION=`` or
``?action[]=`` for ``action`` (ASP.NET, PHP, Node's qs), an ``X_Account`` header for
``x-account`` (CGI and WSGI), and a header or parameter sent twice, whose values policy sees
joined or as a list while the upstream may read either. Such a call is refused.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, unquote_plus

from aegis.clock import Clock
from aegis.config import GatewayAllow
from aegis.crypto.jws import fold_name, holds_unsafe_integer
from aegis.errors import InvalidRequest, Unavailable
from aegis.gateway.names import header_key, name_keys, query_key
from aegis.policy.decision import Decision
from aegis.policy.evaluator import CompiledPolicy
from aegis.policy.ir import leaves
from aegis.policy.readings import decide_readings
from aegis.policy.store import PolicyStore
from aegis.policy.watcher import NO_POLICY_REASON, PolicyWatcher
from aegis.telemetry.logging import log_event

__all__ = [
    "ALLOWLIST_REASON",
    "ALLOWLIST_VERSION",
    "PolicyDirectory",
    "ReadFields",
    "allowlist_decision",
    "misspelled",
    "policy_reads",
    "policy_reads_body",
]

ALLOWLIST_VERSION: Final = "allowlist"
ALLOWLIST_REASON: Final = "no active policy; allowed by the gateway allow-list"
_WILDCARD: Final = "*"
_BODY: Final = ("request", "body")
_QUERY: Final = ("request", "query")
_HEADERS: Final = ("request", "headers")
_MAX_CACHED: Final = 4096


def policy_reads_body(policy: CompiledPolicy, tool: str) -> bool:
    """Whether any rule that can apply to ``tool`` has a condition on the request body."""
    return policy_reads(policy, tool).any_body


@dataclass(frozen=True, slots=True)
class ReadFields:
    """What the conditions of the rules that can apply to one tool read by name: query
    parameters and headers (``every_*`` when one reads the whole object) and body members (each
    path below ``request.body``); ``any_body`` when any condition reads the body at all;
    ``loose_path`` when any reads ``path_loose`` (the call is then decided under each of the
    path's variant readings too)."""

    query: frozenset[str] = frozenset()
    every_query: bool = False
    headers: frozenset[str] = frozenset()
    every_header: bool = False
    body: tuple[tuple[str, ...], ...] = ()
    any_body: bool = False
    loose_path: bool = False

    @property
    def by_name(self) -> bool:
        return bool(self.query or self.every_query or self.headers or self.every_header
                    or self.body)  # fmt: skip


def policy_reads(policy: CompiledPolicy, tool: str, *, enforced: bool = False) -> ReadFields:
    """The :class:`ReadFields` of the rules of ``policy`` that can apply to ``tool``; with
    ``enforced``, of those alone whose outcome is enforced (none in a policy in shadow mode)."""
    query: set[str] = set()
    headers: set[str] = set()
    body: set[tuple[str, ...]] = set()
    every_query = every_header = any_body = loose = False
    if enforced and policy.lowered.mode == "shadow":
        return ReadFields()
    for rule in policy.candidates(tool):
        if enforced and rule.lowered.shadow:
            continue
        nodes = [*rule.lowered.match, *([rule.lowered.when] if rule.lowered.when else [])]
        for leaf in (leaf for node in nodes for leaf in leaves(node)):
            path = tuple(leaf.path)
            if path[:2] == _QUERY and len(path) > 2:
                query.add(path[2])
            elif path[:2] == _HEADERS and len(path) > 2:
                headers.add(path[2])
            elif path[:2] == _BODY and len(path) > 2:
                body.add(path[2:])
            every_query |= _QUERY[: len(path)] == path
            every_header |= _HEADERS[: len(path)] == path
            any_body |= path[:2] == _BODY or _BODY[: len(path)] == path
            loose |= path == ("path_loose",)
    return ReadFields(frozenset(query), every_query, frozenset(headers), every_header,
                      tuple(sorted(body)), any_body, loose)  # fmt: skip


def misspelled(
    reads: ReadFields,
    doc: dict[str, Any],
    fields: tuple[tuple[str, str], ...] = (),
    *,
    joined: bool = False,
    body_names: frozenset[str] | None = frozenset(),
) -> str:
    """Why the call carries a field ``reads`` names under another spelling, or more than once
    (``""``: it does not). ``fields`` are the request's header fields as the upstream gets them
    (lowercase names, repeats kept); with ``joined``, a ``,`` in a value read may join repeats.
    ``body_names`` are the top-level field names of a JSON or form body (None: a body that may
    hold fields the gateway did not read), which frameworks merge with the query's."""
    request = doc.get("request") or {}
    cookies = frozenset(
        pair.split("=", 1)[0].strip()
        for name, value in fields
        if name == "cookie"
        for pair in value.split(";")
    )
    why = _merged(reads, request.get("query") or {}, body_names, cookies)
    if why:
        return why
    if reads.query or reads.every_query:
        wanted = {query_key(n): n for n in reads.query}
        seen: dict[str, str] = {}
        for name, value in (request.get("query") or {}).items():
            # Every key a lenient parser may file it under (``[action]`` is action to Rack 2).
            keys = sorted(name_keys(name))
            key = next((k for k in keys if k in wanted), keys[0])
            if not reads.every_query and key not in wanted:
                continue
            if isinstance(value, list):
                # ``action eq delete`` is false for ["read", "delete"]; the upstream may read
                # either value.
                return (f"the query parameter {name[:64]!r} is repeated and the policy for this "
                        "tool reads it; send it once")  # fmt: skip
            if key in seen:
                return (f"the query parameters {seen[key][:64]!r} and {name[:64]!r} are one "
                        "parameter to some servers (case-insensitive, '[]' suffixes) and the "
                        "policy for this tool reads it; send it once")  # fmt: skip
            seen[key] = name
            if key in wanted and name != wanted[key]:
                return (f"the query parameter {name[:64]!r} is read as {wanted[key]!r} by some "
                        f"servers, and the policy for this tool reads {wanted[key]!r}; spell it "
                        "so")  # fmt: skip
    if (reads.headers or reads.every_header) and fields:
        wanted = {header_key(n): n for n in reads.headers}
        seen = {}
        for name, value in fields:
            key = header_key(name)
            if not reads.every_header and key not in wanted:
                continue
            if joined and "," in value:
                return (f"the header {name[:64]!r} holds ',' and the proxy joins repeated "
                        "fields with ',', so policy cannot tell one value from several, and the "
                        "policy for this tool reads it (set Envoy's encode_raw_headers)")  # fmt: skip
            if key in seen:
                return (f"the header {name[:64]!r} is sent more than once (or also as "
                        f"{seen[key][:64]!r}) and the policy for this tool reads it; send it "
                        "once")  # fmt: skip
            seen[key] = name
            if key in wanted and name != wanted[key]:
                return (f"the header {name[:64]!r} is {wanted[key]!r} to CGI and WSGI servers, "
                        f"and the policy for this tool reads {wanted[key]!r}; spell it so")  # fmt: skip
    body = request.get("body")
    # Each object's names by their folded form, built once: every read path then looks its
    # member up, rather than folding every name of the object again (a body of thousands of
    # members read by hundreds of rules would hold the event loop).
    folded_names: dict[int, dict[str, list[str]]] = {}
    for path in reads.body if isinstance(body, dict) else ():
        node: Any = body
        for depth, member in enumerate(path):
            if type(node) is not dict:
                break
            names = folded_names.get(id(node))
            if names is None:
                names = folded_names[id(node)] = {}
                for name in node:
                    names.setdefault(fold_name(name), []).append(name)
            for name in names.get(fold_name(member), ()):
                if name != member:
                    where = ".".join(path[: depth + 1])
                    return (f"the body member {name[:64]!r} is {member!r} to case-insensitive "
                            "readers (Go's encoding/json, ASP.NET), and the policy for this tool "
                            f"reads request.body.{where}; spell it {member!r}")  # fmt: skip
            node = node.get(member)
    return ""


def _sends_wrapper(
    doc: dict[str, Any], wrapper: str, body_names: Callable[[], frozenset[str] | None] | None
) -> str | None:
    """Where the call names ``wrapper`` under any spelling a lenient parser files under it
    (:func:`~aegis.gateway.names.name_keys`: ``Payment``, ``payment[amount]``), or None.
    Rails wraps only when ``request.parameters`` lacks the key, and those hold the query and
    a form body as well as JSON members."""
    key = query_key(wrapper)
    request = doc.get("request") or {}
    body = request.get("body")
    if isinstance(body, dict) and any(key in name_keys(name) for name in body):
        return "body"
    if any(key in name_keys(name) for name in request.get("query") or {}):
        return "query"
    names = body_names() if body_names is not None else frozenset()
    if names is None or any(key in name_keys(name) for name in names):
        return "body"
    return None


def _merged(
    reads: ReadFields,
    query: dict[str, Any],
    body_names: frozenset[str] | None,
    cookies: frozenset[str] = frozenset(),
) -> str:
    """Rails' ``params``, Laravel's ``input()``, Symfony's ``get()`` and Flask's ``values`` read
    query parameters and body fields as one set of names (some preferring the body, others the
    query), and PHP's ``$_REQUEST`` cookies too: a name policy reads in one place must not also
    come in another."""
    in_body = {query_key(path[0]) for path in reads.body}
    in_query = {query_key(n) for n in reads.query}
    if not (in_body or in_query or reads.every_query):
        return ""
    present = {key for name in query for key in name_keys(name)} if reads.every_query else set()
    for name in cookies:
        # Older PHP decoded cookie names (``+`` as a space too) before filing them.
        keys = name_keys(name) | name_keys(unquote(name)) | name_keys(unquote_plus(name))
        if keys & (in_body | in_query | present):
            return (f"the cookie {name[:64]!r} is one parameter with a field the policy for this "
                    "tool reads, to PHP's $_REQUEST; send it in one place")  # fmt: skip
    for name in query:
        if name_keys(name) & in_body:
            return (f"the query parameter {name[:64]!r} is one parameter with the body member the "
                    "policy for this tool reads, to frameworks that merge query and body (Rails "
                    "params, Symfony's get()); send it in the body only")  # fmt: skip
    if not (in_query or reads.every_query):
        return ""
    if body_names is None:
        return ("the policy for this tool reads query parameters, which frameworks that merge "
                "query and body (Rails params, Laravel's input()) may take from this body, and "
                "the gateway did not read it; send a JSON or form body within "
                "gateway.policy_body_bytes")  # fmt: skip
    for name in body_names:
        if reads.every_query or name_keys(name) & in_query:
            return (f"the body field {name[:64]!r} is one parameter with the query parameter the "
                    "policy for this tool reads, to frameworks that merge query and body (Rails "
                    "params, Laravel's input()); send it in the query only")  # fmt: skip
    return ""


def allowlist_decision(allow: tuple[GatewayAllow, ...], tool: str, agent_id: str) -> Decision:
    """Allow only a listed (tool, agent) pair; everything else is a default deny."""
    for entry in allow:
        if entry.tool == tool and (_WILDCARD in entry.agents or agent_id in entry.agents):
            return Decision("allow", (ALLOWLIST_REASON,), (f"allowlist:{tool}",), ALLOWLIST_VERSION)
    return Decision("deny", (NO_POLICY_REASON,), (), ALLOWLIST_VERSION, code="access_denied")


class PolicyDirectory:
    """Active policies per (tenant, env), each hot-reloaded by its own watcher."""

    def __init__(
        self,
        store: PolicyStore | None,
        *,
        clock: Clock,
        interval: float,
        allow: tuple[GatewayAllow, ...] = (),
        background: bool = False,
    ) -> None:
        self._store, self._clock, self._interval, self._allow = store, clock, interval, allow
        #: With ``background``, one thread polls every watcher each ``interval`` (real time) and
        #: calls read the answer it left, so a slow policy store never holds a call or the event
        #: loop (the gateway); the thread ends when the directory is gone.
        self._background = background
        self._polling = False
        self._watchers: dict[tuple[str, str], PolicyWatcher] = {}
        self._lock = threading.Lock()
        self._read_fields: dict[tuple[str, str, bool], ReadFields] = {}

    def _watcher(self, tenant: str, env: str) -> PolicyWatcher | None:
        if self._store is None:
            return None
        key = (tenant, env)
        watcher = self._watchers.get(key)
        if watcher is None:
            with self._lock:
                watcher = self._watchers.get(key)
                if watcher is None:
                    watcher = PolicyWatcher(
                        self._store,
                        tenant=tenant,
                        env=env,
                        clock=self._clock,
                        interval=self._interval,
                        polled_elsewhere=self._background,
                    )
                    self._watchers[key] = watcher
                    if self._background and not self._polling:
                        self._polling = True
                        _start_polling(weakref.ref(self), self._interval)
        return watcher

    def _reads_body(self, policy: CompiledPolicy, tool: str) -> bool:
        return self._fields_read(policy, tool).any_body

    def _fields_read(
        self, policy: CompiledPolicy, tool: str, *, enforced: bool = False
    ) -> ReadFields:
        key = (policy.version, tool, enforced)
        found = self._read_fields.get(key)
        if found is None:
            if len(self._read_fields) >= _MAX_CACHED:
                self._read_fields.clear()
            found = self._read_fields[key] = policy_reads(policy, tool, enforced=enforced)
        return found

    def reads_body(self, tenant: str, env: str, tool: str, *, enforced: bool = False) -> bool:
        """Whether the policy in force for the route reads request bodies of ``tool`` (the proxy
        then buffers the body for it); with ``enforced``, whether a rule whose outcome is
        enforced does. False for the allow-list, which never does."""
        watcher = self._watcher(tenant, env)
        policy = watcher.current() if watcher is not None else None
        return policy is not None and self._fields_read(policy, tool, enforced=enforced).any_body

    def decide(
        self,
        tenant: str,
        env: str,
        tool: str,
        agent_id: str,
        doc: dict[str, Any],
        *,
        body_hidden: bool = False,
        integers_checked: bool = False,
        fields: tuple[tuple[str, str], ...] = (),
        fields_joined: bool = False,
        body_names: Callable[[], frozenset[str] | None] | None = None,
        wrapper: str | None = None,
    ) -> Decision:
        """The decision for one call; ``body_hidden`` says the call has a body that is not in
        ``doc`` (streamed, over the buffering limit, or not JSON), ``integers_checked`` that the
        door read it refusing integers beyond +-2**53; ``fields`` are its header
        fields as the upstream gets them, ``fields_joined`` whether repeats may have arrived
        joined with ``,``, ``body_names`` gives the body's top-level field names, asked only
        when the policy reads names (see :func:`misspelled`), ``wrapper`` the key the upstream
        files the body's members under (the route's ``wrap_parameters``)."""
        watcher = self._watcher(tenant, env)
        policy = watcher.current() if watcher is not None else None
        if policy is None and watcher is not None and not watcher.nothing_active:
            raise Unavailable(
                "the policy store has not answered and no policy is loaded; call refused",
                code="policy_unavailable",
            )
        if policy is not None:
            # A call is refused for what the rules it is decided by read, never for what a rule
            # in shadow (or a policy in shadow mode) reads: trying a rule out changes no outcome.
            # Shadow rules still see the body when it was read (reads_body buffers it for them);
            # when it was not, they judge the call without it.
            reads = self._fields_read(policy, tool, enforced=True)
            if (
                not integers_checked
                and reads.any_body
                and holds_unsafe_integer((doc.get("request") or {}).get("body"))
            ):
                # Read at the door before a policy reading bodies was in force: decided now.
                raise InvalidRequest(
                    "the body holds an integer beyond +-2**53, which readers that hold numbers "
                    "as doubles (JavaScript, Go) read as another number; send it as a string"
                )
            if body_hidden and reads.any_body:
                raise InvalidRequest(
                    "the policy for this tool reads the request body; send it as JSON "
                    "(content-type application/json, no content-encoding) within "
                    "gateway.max_body_bytes"
                )
            if (
                wrapper is not None
                and reads.any_body
                and (where := _sends_wrapper(doc, wrapper, body_names))
            ):
                raise InvalidRequest(
                    f"the {where} sends {wrapper[:64]!r}, the parameter this tool's upstream "
                    "reads the body's fields from (Rails wrap_parameters), while the policy for "
                    "this tool reads them at the top level of the body; send them there only"
                )
            if reads.by_name:
                names = body_names() if body_names is not None else frozenset()
                why = misspelled(reads, doc, fields, joined=fields_joined, body_names=names)
                if why:
                    raise InvalidRequest(why)
            decision = policy.evaluate(doc)
            if self._fields_read(policy, tool).loose_path:
                return decide_readings(policy, doc, decision)
            return decision
        return allowlist_decision(self._allow, tool, agent_id)

    def could_allow(
        self, tenant: str, env: str, tool: str, agent_id: str, doc: dict[str, Any]
    ) -> bool:
        """Whether a call of ``tool`` by ``agent_id`` could be anything but denied, whatever its
        request holds (:meth:`CompiledPolicy.could_allow`; the allow-list while no policy is
        active). True while neither can be read now: such a call is decided when it is made."""
        watcher = self._watcher(tenant, env)
        policy = watcher.current() if watcher is not None else None
        if policy is not None:
            return policy.could_allow(doc)
        if watcher is None or watcher.nothing_active:
            return allowlist_decision(self._allow, tool, agent_id).action != "deny"
        return True

    def poll_all(self) -> None:
        """One round of the poll thread: every watcher, each failure recorded by its watcher."""
        for watcher in list(self._watchers.values()):
            watcher.poll_now()

    def refresh(self) -> None:
        """Poll every watcher now (after an activation in this process, and in tests)."""
        for watcher in list(self._watchers.values()):
            watcher.poll()


def _start_polling(directory: weakref.ref[PolicyDirectory], interval: float) -> None:
    def run() -> None:
        while True:
            time.sleep(interval)
            alive = directory()
            if alive is None:
                return
            try:
                alive.poll_all()
            except Exception as exc:  # the thread must outlive any one round: calls read it
                log_event("policy.poll_round_failed", level=logging.ERROR, error=type(exc).__name__)
            del alive  # no strong reference while sleeping: the directory may go

    threading.Thread(target=run, name="aegis-policy", daemon=True).start()
