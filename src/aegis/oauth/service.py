"""The token service: client credentials grant, introspection and revocation, free of HTTP.

* ``client_credentials`` (RFC 6749 §4.4): scopes are narrowed to what the agent may hold; the
  audience comes from ``resource`` (RFC 8707) or ``audience`` and must be one Aegis serves.
* Introspection (RFC 7662 §2.2): anything but a valid, live token of the caller's own tenant is
  exactly ``{"active": false}`` — no hint of why.
* Revocation (RFC 7009 §2.2): unknown or invalid tokens get the same success answer; a client may
  revoke only tokens issued to itself; a revoked jti is refused everywhere until it would expire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aegis.clock import Clock
from aegis.errors import GrantError, InvalidRequest, TokenError
from aegis.registry.cache import RegistryCache
from aegis.stores.base import RevocationStore
from aegis.tokens.chain import prefetch_chain_agents, verify_chain
from aegis.tokens.claims import AccessToken, split_scopes
from aegis.tokens.issuer import IssuedToken, TokenIssuer, refuse_changed, refuse_unsettled
from aegis.tokens.subject import check_subject
from aegis.tokens.verifier import AccessTokenVerifier
from aegis.types import AgentStatus, Client, TenantStatus

if TYPE_CHECKING:
    from aegis.tokens.exchange import TokenExchanger

__all__ = ["CLIENT_CREDENTIALS", "TokenRequest", "TokenService"]

CLIENT_CREDENTIALS: Final = "client_credentials"
_INACTIVE: Final[dict[str, Any]] = {"active": False}


@dataclass(frozen=True, slots=True)
class TokenRequest:
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    #: Requested lifetime in seconds; None for the default. Never more than the configured cap.
    lifetime: int | None = None
    #: Proof-of-possession confirmation (``{"jkt": ...}`` or ``{"x5t#S256": ...}``).
    cnf: dict[str, Any] | None = None


class TokenService:
    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        verifier: AccessTokenVerifier,
        cache: RegistryCache,
        revocation: RevocationStore,
        clock: Clock,
        audiences: Sequence[str],
        default_lifetime: int,
        max_lifetime: int,
    ) -> None:
        self._issuer = issuer
        self._verifier = verifier
        self._cache = cache
        self._revocation = revocation
        self._clock = clock
        self._audiences = tuple(audiences)
        self._default_lifetime = default_lifetime
        self._max_lifetime = max_lifetime
        #: The RFC 8693 token-exchange grant (delegation chains); None disables it.
        self.exchanger: TokenExchanger | None = None

    @staticmethod
    def parse_request(form: Mapping[str, Any], resources: Sequence[str]) -> TokenRequest:
        """Read scope, resource/audience and lifetime from a token request form."""
        scopes = split_scopes(form.get("scope")) if "scope" in form else ()
        audiences = tuple(resources) or tuple(
            split_scopes(form.get("audience")) if form.get("audience") else ()
        )
        lifetime = None
        if "expires_in" in form:
            try:
                lifetime = int(form["expires_in"])
            except (TypeError, ValueError):
                raise InvalidRequest("expires_in must be a whole number of seconds") from None
            if lifetime <= 0:
                raise InvalidRequest("expires_in must be positive")
        return TokenRequest(scopes, audiences, lifetime)

    def client_credentials(
        self, client: Client, req: TokenRequest, *, read_at: float | None = None
    ) -> IssuedToken:
        """A token for ``client``; ``read_at``: when its credentials were checked against it
        (``AuthenticatedClient.read_at``), so that a change since refuses (503, ask again)."""
        # As the client was (ClientAuthenticator): read now, so the marks passed on are current.
        agent = self._cache.agent_from_store(client.agent_id)
        if agent.status is not AgentStatus.ACTIVE:
            raise GrantError(
                f"agent {agent.id} is {agent.status.value}", code="unauthorized_client"
            )
        if self._cache.tenant_from_store(agent.tenant_id).status is not TenantStatus.ACTIVE:
            raise GrantError("the agent's tenant is suspended", code="unauthorized_client")
        if read_at is not None:
            current = self._cache.client_from_store(client.client_id)
            # A mark still ahead is waited out (its own wait); one passed since the credentials
            # were checked is a change under way (ask again).
            refuse_unsettled(
                max(agent.tokens_not_before, current.tokens_not_before), self._clock.now()
            )
            refuse_changed(read_at, client, current, agent)
        allowed = agent.allowed_scopes
        if req.scopes:
            granted = tuple(s for s in req.scopes if s in allowed)
            if not granted:
                raise GrantError(
                    "none of the requested scopes is allowed for this agent", code="invalid_scope"
                )
        else:
            granted = allowed
        audiences = req.audiences or self._audiences[:1]
        for aud in audiences:
            if aud not in self._audiences:
                raise GrantError(
                    f"unknown audience {aud!r}; ask for one of {list(self._audiences)}",
                    code="invalid_target",
                )
        lifetime = min(req.lifetime or self._default_lifetime, self._max_lifetime)
        return self._issuer.issue(
            agent_id=agent.id,
            client_id=client.client_id,
            tenant=agent.tenant_id,
            env=agent.env,
            scopes=granted,
            audience=tuple(dict.fromkeys(audiences)),
            lifetime=lifetime,
            cnf=req.cnf,
            not_before=max(agent.tokens_not_before, client.tokens_not_before),
        )

    async def _live(self, token: str) -> AccessToken:
        """The token, if it is live now: signature, times, subject state and, for a delegated
        token, its whole chain as the gateway checks it (a suspended parent ends it)."""
        verified = self._verifier.verify(token)
        # The leeway is for other replicas' clocks; this server's own answer is exact
        # (RFC 7662 §2.2: "active" means, among others, that it has not expired).
        if verified.exp <= self._clock.now():
            raise TokenError("token expired", code="token_expired")
        await check_subject(verified, self._cache, self._revocation)
        if self.exchanger is not None:  # as the gateway's step 6, delegated or not
            await prefetch_chain_agents(verified, self._cache, self.exchanger.rules)
            verify_chain(
                verified, cache=self._cache, rules=self.exchanger.rules, now=self._clock.now()
            )
        elif any(k in verified.claims for k in ("parent_agent", "act", "origin_user")):
            raise TokenError("delegated tokens are not accepted here", code="invalid_claim")
        return verified

    async def introspect(self, token: str, *, tenant: str | None) -> dict[str, Any]:
        """``tenant`` is the caller's tenant; None only for admin callers (any tenant)."""
        try:
            verified = await self._live(token)
        except TokenError:
            return dict(_INACTIVE)
        if tenant is not None and verified.tenant != tenant:
            return dict(_INACTIVE)
        claims = verified.claims
        out: dict[str, Any] = {
            "active": True,
            "token_type": "DPoP" if (verified.cnf or {}).get("jkt") else "Bearer",
        }
        for name in (
            "scope",
            "client_id",
            "sub",
            "aud",
            "iss",
            "exp",
            "iat",
            "nbf",
            "jti",
            "tenant",
            "env",
            "agent_id",
            "cnf",
            "act",
        ):
            if name in claims:
                out[name] = claims[name]
        return out

    async def revoke(
        self, token: str, *, client_id: str | None, tenant: str | None = None
    ) -> AccessToken | None:
        """Revoke ``token``; ``client_id`` None means an admin caller. Silent for unknown tokens.
        Returns the token revoked, None when there was nothing to do. Another client's live
        token of ``tenant`` (the caller's, given while the caller may introspect it anyway) is
        refused, ``unauthorized_client`` (RFC 7009 §2.1): a 200 would read as revoked while
        the token stays live. Another tenant's is answered as an invalid token is, revealing
        nothing."""
        try:
            verified = self._verifier.verify(token)
        except TokenError:
            # RFC 7009 §2.2: invalid tokens do not cause an error response. A token that could
            # not be judged (its key's store unavailable) is not one: 503, never a 200 that
            # reads as done while the token stays live.
            return None
        if client_id is not None and verified.client_id != client_id:
            if tenant is not None and verified.tenant == tenant:
                raise GrantError(
                    "this token was issued to another client: only that client, or an "
                    "operator's admin key, revokes it; it is still live",
                    code="unauthorized_client",
                )
            return None  # another tenant's token: nothing to do, and nothing to reveal
        # Kept past the last moment any replica accepts the token: one whose clock lags this
        # one (within the leeway already allowed for token times) accepts it until
        # exp + leeway on its own clock, later than exp + leeway on this one's.
        await self._revocation.revoke_jti(
            verified.jti, verified.exp + 2 * self._verifier.rules.leeway
        )
        return verified
