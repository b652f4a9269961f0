"""``AgentClient``: one agent's identity, its tokens, its proofs and its delegations.

    agent = AgentClient("https://aegis.example.com", PrivateKey(client_id, key))
    with agent.client(gateway, audience="aegis-gateway", scope="payments:write") as http:
        http.post("/payments/transfer", json={"amount": 120})

Tokens come from ``{issuer}/oauth/token`` (client credentials, or RFC 8693 token exchange when
acting for a parent), are cached per (audience, scope, tenant, delegation) and replaced
``refresh_margin`` seconds before they expire (:mod:`aegis.sdk.cache`). With DPoP on (the default)
every token request and every call carries a fresh proof from :class:`~aegis.sdk.proofs.DpopSigner`
and tokens are bound to its key (``cnf.jkt``). A :class:`~aegis.sdk.credentials.PrivateKey` agent
signs proofs with its own registered key; other kinds use a key made for this client (RFC 9449
allows an ephemeral key), or ``dpop_key``.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from aegis.clock import Clock, SystemClock
from aegis.crypto.keys import Ed25519SigningKey
from aegis.pki.renewal import Credential as Issued
from aegis.sdk.approvals import ApprovalPolicy
from aegis.sdk.auth import (
    PREPARED_FOR,
    AegisAuth,
    default_asleep,
    default_sleep,
    origin_of,
    proof_origin,
    refuse_cleartext,
)
from aegis.sdk.cache import DEFAULT_REFRESH_MARGIN, CachedToken, TokenCache, TokenKey
from aegis.sdk.credentials import Credential, PrivateKey
from aegis.sdk.errors import AegisClientError, InvalidRequestError
from aegis.sdk.grants import chain_subject, exchange_form, extend_chain
from aegis.sdk.proofs import DpopSigner
from aegis.sdk.renewing import RenewingCertificate
from aegis.sdk.retry import RetryPolicy
from aegis.sdk.wire import token_from_response

__all__ = ["AgentClient"]


def _scope(scope: str | Sequence[str] | None) -> str | None:
    if scope is None:
        return None
    parts = scope.split() if isinstance(scope, str) else list(scope)
    return " ".join(sorted(set(parts))) or None


class AgentClient:
    """One agent's client of Aegis. ``issuer_url`` is the control plane (the tokens' ``iss``);
    ``credential`` is one of :mod:`aegis.sdk.credentials`. ``clock`` drives expiry and proof
    times; ``sleep``/``asleep`` every wait (backoff, approvals), so tests can replace both."""

    def __init__(
        self,
        issuer_url: str,
        credential: Credential,
        *,
        dpop: bool = True,
        dpop_key: Ed25519SigningKey | None = None,
        clock: Clock | None = None,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        token_lifetime: int | None = None,
        retry: RetryPolicy | None = None,
        approvals: ApprovalPolicy | None = None,
        timeout: float = 10.0,
        sleep: Callable[[float], None] = default_sleep,
        asleep: Callable[[float], Awaitable[None]] = default_asleep,
    ) -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self.token_url = f"{self.issuer_url}/oauth/token"
        refuse_cleartext(self.token_url)  # the client's credentials go there
        self.credential = credential
        self.clock = clock or SystemClock()
        self.tokens = TokenCache(self.clock, margin=refresh_margin)
        #: Lifetime (seconds) asked for in every token request; None takes the server's default.
        self.token_lifetime = token_lifetime
        self.retry = retry or RetryPolicy()
        self.approvals = approvals or ApprovalPolicy()
        self.sleep, self.asleep = sleep, asleep
        self.signer: DpopSigner | None = None
        if dpop:
            key = dpop_key
            if key is None:
                key = credential.key if isinstance(credential, PrivateKey) else None
            self.signer = DpopSigner(key or Ed25519SigningKey.generate(), clock=self.clock)
        self._tls = credential.ssl_context()
        self._timeout = timeout
        self._renewing = credential if isinstance(credential, RenewingCertificate) else None
        if self._renewing is not None:
            self._renewing.manager.on_renew.append(self._renewed)
        self.http = httpx.Client(timeout=timeout, **self._tls_options(sync=True))
        self._ahttp: httpx.AsyncClient | None = None

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a fixed certificate (None: no certificate, or a renewing one)."""
        return self._tls

    @property
    def renews_certificate(self) -> bool:
        """Whether the agent's certificate is renewed while it runs (:mod:`aegis.sdk.renewing`)."""
        return self._renewing is not None

    @property
    def ahttp(self) -> httpx.AsyncClient:
        if self._ahttp is None:
            self._ahttp = httpx.AsyncClient(timeout=self._timeout, **self._tls_options())
        return self._ahttp

    def _tls_options(self, *, sync: bool = False) -> dict[str, Any]:
        """The TLS identity of a new httpx client: a renewing certificate's rotating transport
        (:mod:`aegis.sdk.renewing`), else a fixed context (or the system trust store)."""
        if self._renewing is None:
            return {"verify": self._tls or True}
        cred = self._renewing
        return {"transport": cred.transport() if sync else cred.async_transport()}

    def _renewed(self, issued: Issued) -> None:
        # Tokens bound to the old certificate would be refused on connections presenting the new
        # one: fetch the next token over a new connection, bound to the new certificate.
        self.tokens.keep_bound_to(issued.x5t_s256)

    def close(self) -> None:
        if self._renewing is not None and self._renewed in self._renewing.manager.on_renew:
            self._renewing.manager.on_renew.remove(self._renewed)
        self.http.close()

    async def aclose(self) -> None:
        self.close()
        if self._ahttp is not None:
            await self._ahttp.aclose()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def agent_key(self) -> Ed25519SigningKey:
        """The agent's own registered key (private_key_jwt agents): it signs grants."""
        if not isinstance(self.credential, PrivateKey):
            raise InvalidRequestError(
                "delegation needs the agent's own key; configure a PrivateKey credential",
                code="invalid_request",
            )
        return self.credential.key

    # -- tokens ------------------------------------------------------------------------------

    def key(
        self,
        audience: str | None = None,
        scope: str | Sequence[str] | None = None,
        tenant: str | None = None,
        subject_token: str | None = None,
    ) -> TokenKey:
        digest = hashlib.sha256(subject_token.encode()).hexdigest()[:32] if subject_token else None
        return TokenKey(audience, _scope(scope), tenant, digest)

    def _token_request(
        self, key: TokenKey, subject_token: str | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        now = self.clock.now()
        form: dict[str, str] = {}
        headers: dict[str, str] = {}
        if subject_token is None:
            form["grant_type"] = "client_credentials"
            self.credential.apply(form, headers, self.issuer_url, now)
        else:
            form.update(exchange_form(subject_token, self.agent_key_assertion(now)))
        if key.scope:
            form["scope"] = key.scope
        if key.audience:
            form["resource"] = key.audience
        if self.token_lifetime is not None:
            form["expires_in"] = str(self.token_lifetime)
        if self.signer is not None:
            headers["DPoP"] = self.signer.proof("POST", self.token_url)
        return form, headers

    def agent_key_assertion(self, now: float) -> str:
        if not isinstance(self.credential, PrivateKey):
            raise InvalidRequestError(
                "acting for a parent needs a PrivateKey credential (the actor token is a "
                "client assertion, RFC 7523)",
                code="invalid_request",
            )
        return self.credential.assertion(self.issuer_url, now)

    def _unavailable(self, response: httpx.Response, attempt: int) -> float | None:
        """The backoff before another token request, when the token service answered 503 (a
        dependency is down) and attempts remain; None to take the answer as it is."""
        if response.status_code != 503 or attempt >= self.retry.unavailable_attempts:
            return None
        return self.retry.delay(attempt, response.headers.get("retry-after"))

    def _accept(self, key: TokenKey, response: httpx.Response) -> CachedToken:
        token = token_from_response(response, now=self.clock.now(), tenant=key.tenant)
        self.tokens.put(key, token)
        if self._renewing is not None:  # asked for on a connection older than a renewal?
            self._renewed(self._renewing.manager.current)
        return token

    def token_for(self, key: TokenKey, *, subject_token: str | None = None) -> CachedToken:
        """The cached token for ``key``, or a new one from the token endpoint: fetched by one
        caller at a time, the others taking what it fetched."""
        cached = self.tokens.get(key)
        if cached is not None:
            return cached
        with self.tokens.fetch_lock(key):
            cached = self.tokens.get(key)
            if cached is not None:
                return cached
            for attempt in range(self.retry.unavailable_attempts + 1):
                # A fresh assertion and proof per attempt: each jti is single use.
                form, headers = self._token_request(key, subject_token)
                response = self.http.post(self.token_url, data=form, headers=headers)
                delay = self._unavailable(response, attempt)
                if delay is None:
                    break
                self.sleep(delay)
            return self._accept(key, response)

    async def atoken_for(self, key: TokenKey, *, subject_token: str | None = None) -> CachedToken:
        """:meth:`token_for`, asynchronously."""
        cached = self.tokens.get(key)
        if cached is not None:
            return cached
        async with self.tokens.afetch_lock(key):
            cached = self.tokens.get(key)
            if cached is not None:
                return cached
            for attempt in range(self.retry.unavailable_attempts + 1):
                form, headers = self._token_request(key, subject_token)
                response = await self.ahttp.post(self.token_url, data=form, headers=headers)
                delay = self._unavailable(response, attempt)
                if delay is None:
                    break
                await self.asleep(delay)
            return self._accept(key, response)

    def token(
        self,
        audience: str | None = None,
        scope: str | Sequence[str] | None = None,
        tenant: str | None = None,
        *,
        on_behalf_of: str | None = None,
    ) -> CachedToken:
        return self.token_for(
            self.key(audience, scope, tenant, on_behalf_of), subject_token=on_behalf_of
        )

    async def atoken(
        self,
        audience: str | None = None,
        scope: str | Sequence[str] | None = None,
        tenant: str | None = None,
        *,
        on_behalf_of: str | None = None,
    ) -> CachedToken:
        return await self.atoken_for(
            self.key(audience, scope, tenant, on_behalf_of), subject_token=on_behalf_of
        )

    # -- calls -------------------------------------------------------------------------------

    def auth(
        self,
        audience: str | None = None,
        scope: str | Sequence[str] | None = None,
        tenant: str | None = None,
        *,
        on_behalf_of: str | None = None,
        raise_for_denial: bool = True,
        origins: Sequence[str] | None = None,
    ) -> AegisAuth:
        """An ``httpx.Auth`` for this agent (acting for a parent with ``on_behalf_of``). It
        sends the token to ``origins`` only (URLs or ``scheme://host[:port]``), by default to
        the origin of its first request: a request elsewhere raises ``ValueError`` unsent."""
        return AegisAuth(
            self,
            self.key(audience, scope, tenant, on_behalf_of),
            subject_token=on_behalf_of,
            raise_for_denial=raise_for_denial,
            origins=origins,
        )

    def client(self, base_url: str = "", **auth: Any) -> httpx.Client:
        """An ``httpx.Client`` with :meth:`auth` and this agent's TLS identity. A redirect it
        follows to another origin carries no proof and no override (:meth:`_foreign`)."""
        return httpx.Client(
            base_url=base_url,
            auth=self.auth(**self._for_base(base_url, auth)),
            timeout=self._timeout,
            event_hooks={"request": [self._foreign]},
            **self._tls_options(sync=True),
        )

    def async_client(self, base_url: str = "", **auth: Any) -> httpx.AsyncClient:
        async def foreign(request: httpx.Request) -> None:
            self._foreign(request)

        return httpx.AsyncClient(
            base_url=base_url,
            auth=self.auth(**self._for_base(base_url, auth)),
            timeout=self._timeout,
            event_hooks={"request": [foreign]},
            **self._tls_options(),
        )

    @staticmethod
    def _for_base(base_url: str, auth: dict[str, Any]) -> dict[str, Any]:
        """A client with a base URL sends its token to that origin (unless told others)."""
        if base_url and "origins" not in auth:
            return {**auth, "origins": (base_url,)}
        return auth

    def _foreign(self, request: httpx.Request) -> None:
        """Run on every request the client sends, redirects included: httpx strips
        ``Authorization`` on a redirect to another origin but keeps the other fields, so a
        ``DPoP`` proof made for another origin (its ``htu``), and the override sent with it
        (with a proof or without one: certificate-bound and Bearer tokens carry none), are
        removed before they reach a host they were not for."""
        here = origin_of(request.url)
        proof = request.headers.get("dpop")
        prepared = request.extensions.get(PREPARED_FOR)
        if (proof is None or proof_origin(proof) == here) and prepared in (None, here):
            return
        request.headers.pop("dpop", None)
        request.headers.pop(self.approvals.header, None)

    # -- delegation --------------------------------------------------------------------------

    def delegate(
        self,
        child: str,
        *,
        scopes: Sequence[str],
        tools: Sequence[str],
        max_depth: int = 0,
        lifetime: int = 120,
        under: str | None = None,
        me: str | None = None,
    ) -> str:
        """A parent-agent grant for ``child`` (docs/delegation.md), signed with this agent's key.

        ``under`` is the chain this agent itself acts under (the grant it was given), so the new
        link extends it; the result is the ``~``-joined chain the child presents as its
        ``subject_token`` (``on_behalf_of=``). ``me`` is this agent's id (default: the last link's
        ``sub`` when ``under`` is given, else the client id's agent from a fresh token).
        """
        parent = me or (chain_subject(under) if under else None) or self._agent_id()
        return extend_chain(
            self.agent_key,
            parent=parent,
            child=child,
            audience=self.issuer_url,
            scopes=scopes,
            tools=tools,
            max_depth=max_depth,
            lifetime=lifetime,
            now=self.clock.now(),
            under=under,
        )

    def _agent_id(self) -> str:
        agent = self.token().claims.get("agent_id")
        if not isinstance(agent, str):
            raise AegisClientError("cannot tell this agent's id; pass me=", code="invalid_request")
        return agent

    # -- policy ------------------------------------------------------------------------------

    def dry_run(self, admin_key: str, call: dict[str, Any], **which: Any) -> dict[str, Any]:
        """``POST /v1/policy/dry-run`` on this control plane (see :func:`policy_dry_run`)."""
        from aegis.sdk.policy import policy_dry_run

        return policy_dry_run(self.issuer_url, admin_key, call, http=self.http, **which)
