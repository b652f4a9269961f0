"""OAuth 2.0 Token Exchange (RFC 8693) for delegation chains, on ``/oauth/token``.

* ``subject_token``: a parent's delegation chain (:data:`DELEGATION_GRANT`, links joined by ``~``,
  the last signed by the parent for the caller), or an end user's JWT from a configured issuer
  (:data:`JWT_TYPE`; keys from configuration only, never from a URL in the token);
* ``actor_token``: the child's own client assertion (RFC 7523, :data:`JWT_TYPE`); the child
  authenticates with it, through the same code as ``private_key_jwt``.

The access token gets requested ∩ granted ∩ the child's allowed scopes, one audience, the nested
``act`` claim (§4.1: current actor outermost), ``parent_agent`` (the verified chain, compact, for
gateways to re-verify), ``delegation_depth``, ``tools`` and, for a user, ``origin_user``. A user
token's ``may_act`` (§4.4) is honoured. Errors (§2.2.2): a refused subject or actor token "MUST be
the invalid_request error code"; the stable Aegis code (``parent_expired`` ...) is kept in the
description, the log event and the error details. Unknown targets are ``invalid_target``.

With an ``audit`` sink (the control plane's audit log) every exchange leaves a
``delegation.exchange`` record: refused ones with the stable code and the whole chain as presented
(issuer, subject, jti and scope of each link), issued ones with the verified chain, the origin
user and the new token's ``jti``. An issued token is returned only once its record is written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from aegis.clock import Clock
from aegis.crypto.jws import parse_compact
from aegis.crypto.keyring import KeyRing
from aegis.errors import AegisError, GrantError, InvalidRequest, ReplayDetected, TokenError
from aegis.registry.cache import RegistryCache
from aegis.stores.base import ReplayStore
from aegis.telemetry.logging import log_event
from aegis.tokens.chain import Chain, ChainRules, audit_rejection, presented_chain, verify_links
from aegis.tokens.claims import split_scopes
from aegis.tokens.delegation import ANY_TOOL, CHAIN_SEPARATOR, mint_grant, split_chain
from aegis.tokens.external import ExternalTrust, verify_user_token
from aegis.tokens.issuer import IssuedToken, TokenIssuer, refuse_changed, refuse_unsettled
from aegis.types import Agent, AgentStatus, TenantStatus

if TYPE_CHECKING:
    from aegis.oauth.client_auth import AuthenticatedClient, ClientAuthenticator

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "DELEGATION_GRANT",
    "EXCHANGE_AUDIT_KIND",
    "JWT_TYPE",
    "TOKEN_EXCHANGE",
    "TokenExchanger",
    "nested_act",
]

TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
DELEGATION_GRANT: Final = "urn:aegis:params:oauth:token-type:delegation-grant"
JWT_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
_JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_CLIENT_AUTH_PARAMS: Final = ("client_secret", "client_assertion", "client_assertion_type")
#: Codes that keep their own meaning on the wire; everything else about the presented tokens is
#: ``invalid_request`` (RFC 8693 §2.2.2).
_WIRE_CODES: Final = frozenset(
    {"invalid_scope", "invalid_target", "rate_limited", "invalid_dpop_proof", "payload_too_large"}
)
EXCHANGE_AUDIT_KIND: Final = "delegation.exchange"
#: ``AuditLog.append_async``: (kind, record) -> committed.
AuditSink = Callable[[str, dict[str, Any]], Awaitable[object]]


def nested_act(agents: Sequence[str]) -> dict[str, Any]:
    """RFC 8693 §4.1 ``act``: the last agent (current actor) outermost, the root innermost."""
    act: dict[str, Any] = {"sub": agents[0]}
    for agent in agents[1:]:
        act = {"sub": agent, "act": act}
    return act


class TokenExchanger:
    """The token-exchange grant, free of HTTP. One instance per token service."""

    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        keyring: KeyRing,
        cache: RegistryCache,
        replay: ReplayStore,
        authenticator: ClientAuthenticator,
        clock: Clock,
        rules: ChainRules,
        audiences: Sequence[str],
        default_lifetime: int,
        max_lifetime: int,
        external: Sequence[ExternalTrust] = (),
        audit: AuditSink | None = None,
    ) -> None:
        self._issuer = issuer
        self._keyring = keyring
        self._cache = cache
        self._replay = replay
        self._auth = authenticator
        self._clock = clock
        self.rules = rules
        self._audiences = tuple(audiences)
        self._default_lifetime = default_lifetime
        self._max_lifetime = max_lifetime
        self._external = {t.issuer: t for t in external}
        self._audit = audit

    async def exchange(
        self,
        form: Mapping[str, str],
        resources: Sequence[str],
        *,
        authorization: str | None,
        source: str,
        confirm: Callable[[AuthenticatedClient], Awaitable[dict[str, Any] | None]] | None = None,
        spend: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[IssuedToken, AuthenticatedClient]:
        """Validate the whole request, then spend the proof, assertion and grant jtis, then issue.

        ``confirm`` returns the new token's ``cnf`` (DPoP key or certificate thumbprint) for the
        authenticated child, or raises if the child must bind and did not; ``spend`` spends
        what ``confirm`` checked (a DPoP proof's ``jti``), once everything else is valid.
        """
        subject = form.get("subject_token", "")
        delegated = form.get("subject_token_type") == DELEGATION_GRANT
        presented = subject.split(CHAIN_SEPARATOR) if delegated else []
        links: list[str] = []
        child: Agent | None = None
        try:
            self._check_params(form, authorization)
            if delegated:
                links = split_chain(subject, max_links=self.rules.max_depth)
            auth = await self._actor(form, source)
            child = self._cache.agent_from_store(auth.client.agent_id)
            if child.status is not AgentStatus.ACTIVE:
                raise TokenError(f"agent {child.id} is {child.status.value}", code="agent_inactive")
            # As the client-credentials grant refuses it: suspending a tenant leaves its agents
            # active, so their state alone would let a grant signed afterwards be exchanged.
            if self._cache.tenant(child.tenant_id).status is not TenantStatus.ACTIVE:
                raise TokenError(f"tenant {child.tenant_id} is suspended", code="tenant_inactive")
            # Read before anything single-use (the client assertion, the grant) is spent: a
            # mistyped expires_in must not burn the grant its corrected retry needs.
            requested = _lifetime(form)
            now = self._clock.now()
            refuse_unsettled(max(child.tokens_not_before, auth.client.tokens_not_before), now)
            refuse_changed(
                auth.read_at, auth.client, self._cache.client_from_store(auth.client.client_id),
                child,
            )  # fmt: skip
            if links:
                chain = self._delegated(links, child, now)
                parent_agent, granted = subject, chain.grants[-1].scopes
            else:
                chain, parent_agent, granted = self._user_rooted(subject, child, auth, now)
            _refuse_past_user(chain, now)
            scopes = self._scopes(form, granted, child)
            audience = self._audience(form, resources)
            cnf = await confirm(auth) if confirm is not None else None
            if spend is not None:
                await spend()
            auth = await self._auth.consume(auth, source)  # a replay counts as a failure
            if links:
                await self._consume(chain)
            # Judged again after the awaits (a slow replay store): the token is minted now.
            now = self._clock.now()
            _refuse_past_user(chain, now)
        except AegisError as exc:
            audit_rejection(
                exc, stage="exchange", agent=child.id if child else None, links=presented
            )
            # A user's subject token is summarised like a link (iss, sub, jti, scope), unverified.
            await self._record_refusal(exc, child, presented or ([subject] if subject else []))
            raise _on_the_wire(exc) from exc
        extra: dict[str, Any] = {
            "act": nested_act(chain.agents),
            "parent_agent": parent_agent,
            "delegation_depth": chain.depth,
            "tools": list(chain.tools or (ANY_TOOL,)),
        }
        if chain.origin_user is not None:
            extra["origin_user"] = chain.origin_user
            extra["origin_iss"] = chain.origin_issuer
        lifetime = min(requested or self._default_lifetime, self._max_lifetime)
        if chain.origin_exp is not None:  # acting for a user: never past the user's own token
            lifetime = min(lifetime, math.floor(chain.origin_exp - now))
        issued = self._issuer.issue(
            agent_id=child.id,
            client_id=auth.client.client_id,
            tenant=child.tenant_id,
            env=child.env,
            scopes=scopes,
            audience=(audience,),
            lifetime=lifetime,
            cnf=cnf,
            extra=extra,
            not_before=max(child.tokens_not_before, auth.client.tokens_not_before),
            expires_by=chain.origin_exp,
        )
        if self._audit is not None:  # fails closed: no record, no token
            await self._audit(
                EXCHANGE_AUDIT_KIND,
                {
                    "action": "issued",
                    "agent_id": child.id,
                    "client_id": auth.client.client_id,
                    "tenant": child.tenant_id,
                    "env": child.env,
                    "chain": list(chain.agents),
                    "depth": chain.depth,
                    "origin_user": chain.origin_user,
                    "origin_iss": chain.origin_issuer,
                    "grant_jti": chain.grants[-1].jti if links else None,
                    "token_jti": issued.claims["jti"],
                    "scope": " ".join(scopes),
                },
            )
        return issued, auth

    async def _record_refusal(
        self, exc: AegisError, child: Agent | None, presented: Sequence[str]
    ) -> None:
        """The refusal's audit record; a sink failure is logged, the refusal stands."""
        if self._audit is None:
            return
        record = {
            "action": "refused",
            "code": exc.code,
            "reason": exc.message,
            "agent_id": child.id if child is not None else None,
            "tenant": child.tenant_id if child is not None else None,
            "chain_presented": presented_chain(presented),
        }
        try:
            await self._audit(EXCHANGE_AUDIT_KIND, record)
        except AegisError as failure:
            log_event("delegation.audit_failed", level=logging.ERROR, code=failure.code)

    # -- steps -----------------------------------------------------------------------------

    def _check_params(self, form: Mapping[str, str], authorization: str | None) -> None:
        for name in ("subject_token", "subject_token_type", "actor_token", "actor_token_type"):
            if not form.get(name):
                raise InvalidRequest(f"{name} is required for token exchange")
        if form["subject_token_type"] not in (DELEGATION_GRANT, JWT_TYPE):
            raise InvalidRequest(f"subject_token_type must be {DELEGATION_GRANT} or {JWT_TYPE}")
        if form["actor_token_type"] != JWT_TYPE:
            raise InvalidRequest(f"actor_token_type must be {JWT_TYPE} (a client assertion)")
        if form.get("requested_token_type", ACCESS_TOKEN_TYPE) != ACCESS_TOKEN_TYPE:
            raise InvalidRequest(f"requested_token_type must be {ACCESS_TOKEN_TYPE}")
        if authorization or any(p in form for p in _CLIENT_AUTH_PARAMS):
            raise InvalidRequest(
                "authenticate with the actor_token only, not with other credentials"
            )

    async def _actor(self, form: Mapping[str, str], source: str) -> AuthenticatedClient:
        assertion = {"client_assertion_type": _JWT_BEARER, "client_assertion": form["actor_token"]}
        if "client_id" in form:
            assertion["client_id"] = form["client_id"]
        return await self._auth.authenticate(assertion, None, source, consume=False)

    def _delegated(self, links: list[str], child: Agent, now: float) -> Chain:
        chain = verify_links(
            links,
            cache=self._cache,
            rules=self.rules,
            tenant=child.tenant_id,
            env=child.env,
            at=now,
        )
        last = chain.grants[-1]
        if last.sub != child.id:
            raise GrantError("the grant was made for another agent", code="invalid_grant")
        if last.iss == self.rules.issuer:
            raise GrantError(
                "the last link must be signed by the parent agent", code="invalid_grant"
            )
        return chain

    def _user_rooted(
        self, subject: str, child: Agent, auth: AuthenticatedClient, now: float
    ) -> tuple[Chain, str, tuple[str, ...]]:
        """The chain a user's token roots (a grant Aegis signs from itself to ``child``, carrying
        the user token's ``exp``, which bounds the root and everything below it), the root and
        the scopes it grants."""
        iss = parse_compact(subject).payload.get("iss")  # selects the trust only; verified below
        trust = self._external.get(iss) if isinstance(iss, str) else None
        if trust is None:
            raise GrantError("the subject_token's issuer is not trusted here", code="invalid_grant")
        user = verify_user_token(
            subject, trust, actors=(child.id, auth.client.client_id), now=now,
            actor_issuer=self.rules.issuer,
        )  # fmt: skip
        if trust.tenant != child.tenant_id:
            raise TokenError("the user's issuer serves another tenant", code="tenant_mismatch")
        granted = user.scopes if user.scopes is not None else child.allowed_scopes
        granted = tuple(s for s in granted if s in child.allowed_scopes)
        key = self._keyring.signing_key()
        root = mint_grant(
            key,
            parent=self.rules.issuer,
            child=child.id,
            audience=self.rules.issuer,
            scopes=granted,
            tools=(ANY_TOOL,),
            max_depth=self.rules.max_depth - 1,
            now=now,
            lifetime=min(300, max(1, math.floor(user.exp - now))),
            alg=self._keyring.settings.signing_alg,
            extra={"origin_user": user.sub, "origin_iss": trust.issuer, "origin_exp": user.exp},
        )
        chain = verify_links(
            [root],
            cache=self._cache,
            rules=self.rules,
            tenant=child.tenant_id,
            env=child.env,
            at=now,
        )
        return chain, root, granted

    def _scopes(
        self, form: Mapping[str, str], granted: Sequence[str], child: Agent
    ) -> tuple[str, ...]:
        base = tuple(s for s in granted if s in child.allowed_scopes)
        requested = tuple(dict.fromkeys(split_scopes(form.get("scope")))) if "scope" in form else ()
        if requested and not set(requested) <= set(base):
            raise GrantError(
                "scope exceeds what the grant and the agent allow", code="invalid_scope"
            )
        scopes = requested or base
        if not scopes:
            raise GrantError(
                "no scope is both granted and allowed for this agent", code="invalid_scope"
            )
        return scopes

    def _audience(self, form: Mapping[str, str], resources: Sequence[str]) -> str:
        targets = list(resources) or (
            split_scopes(form.get("audience")) if form.get("audience") else []
        )
        if len(targets) > 1:
            raise GrantError("a delegated token has exactly one audience", code="invalid_target")
        target = targets[0] if targets else self._audiences[0]
        if target not in self._audiences:
            raise GrantError(f"unknown audience {target!r}", code="invalid_target")
        return target

    async def _consume(self, chain: Chain) -> None:
        last = chain.grants[-1]
        try:
            # exp + 2 x leeway: a replica whose clock lags this one's accepts the grant until
            # exp + leeway on its own clock (see Pipeline's single-use tokens).
            await self._replay.consume(
                "delegation_grant", f"{last.iss}:{last.jti}", last.exp + 2 * self.rules.leeway
            )
        except ReplayDetected as exc:
            raise TokenError(
                "this grant was already exchanged; ask the parent for a new one",
                code="grant_replayed",
            ) from exc


def _lifetime(form: Mapping[str, str]) -> int | None:
    if "expires_in" not in form:
        return None
    raw = form["expires_in"]
    # At most 9 digits: more is capped by the maximum lifetime anyway, and int() refuses (a
    # ValueError, not a typed refusal) a string of over 4300.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) <= 0:
        raise InvalidRequest("expires_in must be a positive whole number of seconds (9 digits "
                             "at most)")  # fmt: skip
    return int(raw)


def _on_the_wire(exc: AegisError) -> AegisError:
    """RFC 8693 §2.2.2: refused subject or actor tokens are ``invalid_request`` on the wire."""
    if exc.code in _WIRE_CODES or exc.spec.status >= 500 or exc.code == "invalid_request":
        return exc
    return InvalidRequest(
        f"{exc.message} ({exc.code})", code="invalid_request", reason=exc.code, **exc.details
    )


def _refuse_past_user(chain: Chain, now: float) -> None:
    """A chain acting for a user mints nothing past the user's token: not in the leeway after
    it expired (the leeway forgives skew in judging a token, not a new one minted from it), not
    in its last second (a token lives whole seconds), and not from a link signed after it."""
    user_exp = chain.origin_exp
    if user_exp is None:
        return
    if math.floor(user_exp - now) < 1 or any(g.iat >= user_exp for g in chain.grants[1:]):
        raise TokenError(
            "the user's token this chain acts for has expired; the user must sign in again",
            code="parent_expired",
        )
