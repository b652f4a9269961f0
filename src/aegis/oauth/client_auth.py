"""OAuth client authentication at the token endpoint (RFC 6749 §2.3, RFC 7523 §3, RFC 7521 §4.2).

Supported: ``client_secret_basic``, ``client_secret_post``, ``private_key_jwt``, and the mutual-TLS
methods ``tls_client_auth`` and ``self_signed_tls_client_auth`` (RFC 8705 §2, checked in
:mod:`aegis.pki.binding`; the request then carries only ``client_id``). A request must
use exactly one method (RFC 6749 §2.3: "The client MUST NOT use more than one authentication method
in each request"), and it must be the method the client registered. Failures are counted per client
and per source address; past the limit the caller gets ``rate_limited`` until the window passes.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final
from urllib.parse import unquote_plus

from aegis.clock import Clock
from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import PublicKey, public_key_from_jwk
from aegis.errors import AegisError, ClientAuthError, InvalidRequest, NotFound
from aegis.pki.binding import check_self_signed_client, check_tls_client, unproven_client
from aegis.pki.peer import PeerIdentity
from aegis.registry.cache import RegistryCache
from aegis.registry.service import RegistryService
from aegis.stores.base import ReplayStore
from aegis.tokens.verifier import VerifyRules, verify_jwt
from aegis.types import Agent, Client, ClientAuthMethod

__all__ = [
    "JWT_BEARER_ASSERTION",
    "AuthenticatedClient",
    "ClientAuthenticator",
    "FailureLimiter",
]

JWT_BEARER_ASSERTION: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Client assertions may be signed with the agent's Ed25519 or P-256 key.
ASSERTION_ALGS: Final = frozenset({"EdDSA", "Ed25519", "ES256"})
#: Longest client id used as a rate-limit key (registered ids are far shorter).
_MAX_CLIENT_ID: Final = 256


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client: Client
    method: ClientAuthMethod
    #: For private_key_jwt: the assertion's (namespace, jti key, expiry) still to be consumed.
    pending_jti: tuple[str, str, float] | None = None
    #: When the records the credentials were checked against were read: a mark set since (a
    #: key removed, the client disabled) ends what was authenticated (``TokenService``).
    read_at: float = 0.0


class FailureLimiter:
    """Sliding-window count of failed authentications per key (client id, source address)."""

    def __init__(self, clock: Clock, *, limit: int, window: float, max_keys: int = 50_000) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def _trimmed(self, q: deque[float], now: float) -> deque[float]:
        while q and now - q[0] >= self._window:
            q.popleft()
        return q

    def check(self, *keys: str) -> None:
        """Refuse while any key has ``limit`` failures in the window. Reads only: a request
        that is never counted as a failure holds no entry, so requests that do not fail cannot
        crowd out the counts of those that did."""
        now = self._clock.monotonic()
        for key in keys:
            q = self._hits.get(key)
            if q is not None and len(self._trimmed(q, now)) >= self._limit:
                raise AegisError(
                    "too many failed client authentications; wait and retry", code="rate_limited"
                )

    def record_failure(self, *keys: str) -> None:
        now = self._clock.monotonic()
        for key in keys:
            q = self._hits.get(key)
            if q is None:
                if len(self._hits) >= self._max_keys and not self._make_room(now):
                    continue  # bounded memory: this key goes uncounted, never all of them
                q = self._hits[key] = deque()
            self._trimmed(q, now).append(now)

    def _make_room(self, now: float) -> bool:
        """Free entries for new keys when the table is full: first those with no failure left
        in the window, then those still under the limit; never one that refuses now (flooding
        the table with new keys must not lift a limit). False when every key refuses now."""
        self._hits = {k: q for k, q in self._hits.items() if self._trimmed(q, now)}
        if len(self._hits) < self._max_keys:
            return True
        self._hits = {k: q for k, q in self._hits.items() if len(q) >= self._limit}
        return len(self._hits) < self._max_keys


def _parse_basic(header: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded, then joined by ':' and base64-encoded."""
    try:
        # A header byte >= 0x80 arrives as a non-ASCII character, which b64decode refuses with a
        # plain ValueError (binascii.Error is one too).
        raw = base64.b64decode(header, validate=True).decode("utf-8")
    except ValueError as exc:
        raise ClientAuthError("malformed Basic credentials", basic=True) from exc
    client_id, sep, secret = raw.partition(":")
    if not sep or not client_id:
        raise ClientAuthError("malformed Basic credentials", basic=True)
    return unquote_plus(client_id), unquote_plus(secret)


def _assertion_subject(assertion: str) -> str:
    """The unverified ``sub`` of a client assertion, or "" when there is none to read. Used only
    as a rate-limit key; :meth:`ClientAuthenticator._check_assertion` verifies it."""
    try:
        sub = parse_compact(assertion).payload.get("sub")
    except AegisError:
        return ""
    return sub if isinstance(sub, str) and 0 < len(sub) <= _MAX_CLIENT_ID else ""


class ClientAuthenticator:
    def __init__(
        self,
        registry: RegistryService,
        cache: RegistryCache,
        replay: ReplayStore,
        *,
        clock: Clock,
        audiences: frozenset[str],
        assertion_max_lifetime: float,
        leeway: float,
        limiter: FailureLimiter,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._replay = replay
        self._clock = clock
        self._audiences = audiences
        self._max_life = assertion_max_lifetime
        self._leeway = leeway
        self.limiter = limiter
        #: Checks a ``tls_client_auth`` certificate (its serial) as the store holds it now, for
        #: the agent as read now; raises ``ClientAuthError``. Set by the internal CA; without
        #: one, no certificate authenticates a ``tls_client_auth`` client.
        self.certificate_now: Callable[[str, Agent], None] | None = None

    async def authenticate(
        self,
        form: Mapping[str, str],
        authorization: str | None,
        source: str,
        *,
        consume: bool = True,
        peer: PeerIdentity | None = None,
        client_cert: bytes | None = None,
    ) -> AuthenticatedClient:
        """Authenticate the caller of the token, introspection or revocation endpoint.

        With ``consume=False`` a client assertion's jti is not recorded yet: the caller finishes
        validating the request and then calls :meth:`consume`, so a refused request writes nothing.
        """
        read_at = self._clock.now()
        basic = (
            authorization[6:].strip()
            if authorization and authorization[:6].lower() == "basic "
            else None
        )
        methods = [basic is not None, "client_secret" in form, "client_assertion" in form]
        if not any(methods) and client_cert is not None and form.get("client_id"):
            return replace(
                self._authenticate_mtls(form["client_id"], peer, client_cert, source),
                read_at=read_at,
            )
        if sum(methods) != 1:
            raise InvalidRequest(
                "use exactly one client authentication method (Basic, client_secret or client_assertion)"
                if sum(methods)
                else "client authentication is required",
                code="invalid_request" if sum(methods) else "invalid_client",
            )
        if basic is not None:
            client_id, secret = _parse_basic(basic)
            method = ClientAuthMethod.CLIENT_SECRET_BASIC
        elif "client_secret" in form:
            client_id, secret = form.get("client_id", ""), form["client_secret"]
            method = ClientAuthMethod.CLIENT_SECRET_POST
        else:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
                raise InvalidRequest(f"client_assertion_type must be {JWT_BEARER_ASSERTION}")
            # The client an assertion names is counted before its signature is checked, so
            # forged assertions for one client from many addresses still reach its limit.
            client_id, secret = _assertion_subject(form.get("client_assertion", "")), ""
            method = ClientAuthMethod.PRIVATE_KEY_JWT
        keys = [f"addr:{source}"] + ([f"client:{client_id}"] if client_id else [])
        self.limiter.check(*keys)
        try:
            pending = None
            if method is ClientAuthMethod.PRIVATE_KEY_JWT:
                client, pending = self._check_assertion(form)
            else:
                client = self._check_secret(client_id, secret, method, form)
            auth = AuthenticatedClient(client, method, pending, read_at)
            if consume:
                await self.consume(auth)
        except ClientAuthError:
            self.limiter.record_failure(*keys)
            raise
        return auth

    async def consume(
        self, auth: AuthenticatedClient, source: str | None = None
    ) -> AuthenticatedClient:
        """Record the client assertion's jti; a second use is ``invalid_client`` and, when
        ``source`` is given, counts as a failure of that address and of the client."""
        if auth.pending_jti is None:
            return auth
        namespace, key, expires_at = auth.pending_jti
        try:
            await self._replay.consume(namespace, key, expires_at)
        except AegisError as exc:
            if exc.code == "replay_detected":
                if source is not None:
                    self.limiter.record_failure(f"addr:{source}", f"client:{auth.client.client_id}")
                raise ClientAuthError("client assertion was already used (jti replayed)") from exc
            raise
        return replace(auth, pending_jti=None)

    def _authenticate_mtls(
        self, client_id: str, peer: PeerIdentity | None, cert: bytes, source: str
    ) -> AuthenticatedClient:
        """RFC 8705 §2: the connection's client certificate authenticates ``client_id``."""
        keys = [f"addr:{source}", f"client:{client_id}"]
        self.limiter.check(*keys)
        try:
            client = self._load(client_id)
            agent = self._cache.agent_from_store(client.agent_id)
            if client.auth_method is ClientAuthMethod.TLS_CLIENT_AUTH:
                check_tls_client(client, agent, peer)
                assert peer is not None  # check_tls_client refuses a missing one
                # The peer was validated on cached records (the CRL's, the registry's): the
                # certificate is checked again as the store holds it now, as the client was.
                if self.certificate_now is None:
                    raise ClientAuthError("no certificate store to check the certificate against")
                self.certificate_now(peer.serial, agent)
            else:
                check_self_signed_client(client, agent, cert)
        except ClientAuthError as exc:
            self.limiter.record_failure(*keys)
            # Until the certificate has proved the client, every refusal reads the same as for
            # a client that does not exist (which certificate a client takes is not for an
            # unauthenticated caller to learn); what was wrong is logged.
            raise unproven_client(str(exc.details.get("detail", exc.message))) from exc
        return AuthenticatedClient(client, client.auth_method)

    def _load(self, client_id: str) -> Client:
        """The client as the store holds it now, never a cached copy: a secret stopped, a key
        removed or a client disabled a moment ago on any replica authenticates nothing here
        (the token service's cache would take them for up to ``registry_cache_ttl``, and what
        it issued would live). Its agent is read alike."""
        try:
            client = self._cache.client_from_store(client_id)
        except NotFound:
            raise unproven_client("no such client") from None
        if not client.active:
            raise unproven_client("the client is disabled")
        return client

    def _check_secret(
        self, client_id: str, secret: str, method: ClientAuthMethod, form: Mapping[str, str]
    ) -> Client:
        if (
            method is ClientAuthMethod.CLIENT_SECRET_BASIC
            and form.get("client_id", client_id) != client_id
        ):
            raise InvalidRequest("client_id in the body differs from the Basic credentials")
        client = self._load(client_id)
        self._registry.check_secret(client, secret)  # constant-time over every stored secret
        if client.auth_method is not method:
            raise ClientAuthError(f"client is registered for {client.auth_method.value}")
        return client

    def _rules(self, client_id: str) -> VerifyRules:
        return VerifyRules(
            typ="jwt",
            typ_required=False,
            kid_required=False,
            issuer=client_id,
            audience=None,
            algs=ASSERTION_ALGS,
            leeway=self._leeway,
            required=frozenset({"iss", "sub", "aud", "exp", "jti"}),
            max_lifetime=self._max_life,
        )

    def _check_assertion(self, form: Mapping[str, str]) -> tuple[Client, tuple[str, str, float]]:
        """RFC 7523 §3: iss = sub = client_id, aud = us, exp required and short, jti single-use."""
        assertion = form.get("client_assertion", "")
        try:
            unverified = parse_compact(assertion).payload
        except AegisError as exc:
            raise ClientAuthError("client assertion is malformed") from exc
        client_id = unverified.get("sub")
        if not isinstance(client_id, str) or unverified.get("iss") != client_id:
            raise ClientAuthError("client assertion must have iss = sub = client_id")
        if form.get("client_id", client_id) != client_id:
            raise InvalidRequest("client_id differs from the client assertion's subject")
        client = self._load(client_id)
        if client.auth_method is not ClientAuthMethod.PRIVATE_KEY_JWT:
            raise unproven_client(f"client is registered for {client.auth_method.value}")
        agent = self._cache.agent_from_store(client.agent_id)
        keys: dict[str, PublicKey] = {}
        for jwk in agent.jwks:
            key = public_key_from_jwk({k: v for k, v in jwk.items() if k != "kid"})
            keys[str(jwk.get("kid", key.kid))] = key
            keys.setdefault(key.kid, key)
        if len(agent.jwks) == 1:
            # An assertion without kid is accepted only when exactly one key is registered.
            keys[""] = keys[next(iter(keys))]
        now = self._clock.now()
        try:
            claims = verify_jwt(assertion, keys.get, self._rules(client_id), now).payload
        except AegisError as exc:
            raise unproven_client(f"client assertion rejected: {exc.code}") from exc
        # draft-ietf-oauth-rfc7523bis: the issuer identifier, as a string, and nothing else. An
        # assertion naming the token endpoint (which a hostile authorization server can claim as
        # its own in its metadata), or other audiences too, could have been made for another
        # party, and be played here.
        if not isinstance(claims["aud"], str) or claims["aud"] not in self._audiences:
            raise ClientAuthError(
                "client assertion audience must be the issuer identifier alone, as a string "
                "(not the token endpoint, not a list)"
            )
        exp = float(claims["exp"])
        if exp - now > self._max_life:
            raise ClientAuthError(f"client assertion must expire within {int(self._max_life)} s")
        # Remembered until exp + 2 x leeway: a replica whose clock lags this one's (within the
        # leeway) still accepts the assertion at exp + leeway on this one's clock.
        return client, ("client_assertion", f"{client_id}:{claims['jti']}", exp + 2 * self._leeway)
