"""``httpx.Auth`` for agents: any httpx client gains Aegis with one argument (sync and async).

    with httpx.Client(auth=agent.auth(audience="aegis-gateway", scope="payments:write")) as http:
        http.post(f"{gateway}/payments/transfer", json={...})

Per request the flow takes the cached token (fetching or refreshing it first), sets
``Authorization: DPoP <token>`` and a freshly signed ``DPoP`` proof for exactly this method and URL,
sends, and reads the answer. A gateway refusal becomes a typed :mod:`aegis.sdk.errors` exception
(with ``code`` and ``decision_id``); what is retried and what never is, is decided in
:mod:`aegis.sdk.retry`. An upstream's own error answers are returned untouched.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, Final

import httpx

from aegis.sdk.approvals import ApprovalWait
from aegis.sdk.cache import CachedToken, TokenKey
from aegis.sdk.errors import ApprovalRequiredError
from aegis.sdk.retry import Attempts, Step, plan
from aegis.sdk.wire import parse_body

if TYPE_CHECKING:
    from aegis.sdk.client import AgentClient

__all__ = ["PREPARED_FOR", "AegisAuth"]


#: The request extension naming the origin the auth flow prepared a request for.
PREPARED_FOR: Final = "aegis.prepared_for"


class AegisAuth(httpx.Auth):
    """Authenticates requests as one agent, for one (audience, scope, tenant[, delegation])."""

    def __init__(
        self,
        client: AgentClient,
        key: TokenKey,
        *,
        subject_token: str | None = None,
        raise_for_denial: bool = True,
        origins: Iterable[str] | None = None,
    ) -> None:
        self._client = client
        self._key = key
        self._subject = subject_token
        self._raise = raise_for_denial
        #: The origins this auth sends its token to (``scheme://host:port``): those named, or
        #: else the first request's. A token is for an audience, not for any URL a caller (or
        #: an agent's prompt) hands the client: to another origin it would be a leaked token.
        self._origins = (
            None if origins is None else frozenset(origin_of(httpx.URL(o)) for o in origins)
        )
        self._pinning = threading.Lock()
        #: Each server's last DPoP nonce, by origin (RFC 9449 §8.2: used "until the server
        #: provides the client with a new nonce"; a nonce is its server's, never another's), so
        #: only the first call to each pays the extra round trip.
        self._nonces: dict[str, str] = {}

    # -- one attempt -------------------------------------------------------------------------

    def _admit(self, request: httpx.Request) -> None:
        """Refuse, before anything is sent, a request to an origin this auth is not for."""
        here = origin_of(request.url)
        with self._pinning:
            if self._origins is None:
                self._origins = frozenset({here})
        if here not in self._origins:
            raise ValueError(
                f"{here}: this auth sends its token to {', '.join(sorted(self._origins))} only; "
                "name the others with origins=, or use an auth per server"
            )

    def _nonce_for(self, request: httpx.Request) -> str | None:
        return self._nonces.get(origin_of(request.url))

    def _keep_nonce(self, request: httpx.Request, nonce: str | None) -> str | None:
        if nonce is not None:
            if len(self._nonces) >= _MAX_NONCES:
                self._nonces.clear()
            self._nonces[origin_of(request.url)] = nonce
        return nonce

    def _prepare(
        self, request: httpx.Request, token: CachedToken, nonce: str | None, override: str | None
    ) -> None:
        refuse_cleartext(request.url)
        # Where these credentials are for: a redirect keeps the extensions, and the client's
        # request hook drops what it must not carry to another origin (AgentClient._foreign).
        request.extensions[PREPARED_FOR] = origin_of(request.url)
        signer = self._client.signer
        if token.token_type.lower() == "dpop" and signer is not None:
            request.headers["Authorization"] = f"DPoP {token.access_token}"
            request.headers["DPoP"] = signer.proof(
                request.method, str(request.url), access_token=token.access_token, nonce=nonce
            )
        else:
            request.headers["Authorization"] = f"Bearer {token.access_token}"
        if override is not None:
            request.headers[self._client.approvals.header] = override

    def _plan(self, request: httpx.Request, response: httpx.Response, attempts: Attempts) -> Step:
        c = self._client
        if response.request is not request:
            # The answer to a request a redirect made, not to the one this flow prepared (from
            # another origin, perhaps, after the gateway had acted on a POST): passed on as it
            # came, never read as the gateway's refusal, retried or taken a nonce from.
            return Step("done")
        return plan(
            response,
            attempts,
            c.retry,
            approvals=c.approvals.enabled,
            raise_for_denial=self._raise,
        )

    def _poll_request(self, wait: ApprovalWait, token: CachedToken) -> httpx.Request:
        request = httpx.Request("GET", wait.status_url)
        self._prepare(request, token, None, None)
        return request

    # -- sync --------------------------------------------------------------------------------

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        refuse_cleartext(request.url)
        self._admit(request)
        c = self._client
        token = c.token_for(self._key, subject_token=self._subject)
        attempts, nonce, override = Attempts(), self._nonce_for(request), None
        while True:
            self._prepare(request, token, nonce, override)
            response = yield request
            if response.status_code >= 400:
                response.read()  # refusals are small; allowed answers stay streamed
            step = self._plan(request, response, attempts)
            if step.kind == "done":
                return
            if step.kind == "raise":
                assert step.error is not None
                raise step.error
            if step.kind == "refresh":
                c.tokens.discard(self._key, token.access_token)
                token = c.token_for(self._key, subject_token=self._subject)
            elif step.kind == "nonce":
                nonce = self._keep_nonce(request, step.nonce)
            elif step.kind == "backoff":
                c.sleep(step.delay)
                token = c.token_for(self._key, subject_token=self._subject)
            elif step.kind == "approval":
                assert isinstance(step.error, ApprovalRequiredError)
                override = self._wait_sync(step.error, token)
                # The wait lasted minutes: the call goes with the token the cache holds now
                # (replaced before its expiry, or bound to a renewed certificate).
                token = c.token_for(self._key, subject_token=self._subject)

    def _wait_sync(self, refusal: ApprovalRequiredError, token: CachedToken) -> str:
        """Poll until the human decided. Each poll takes the cached token anew (a wait outlasts
        a token's last minutes), and one the server finds expired is refreshed once and the
        poll repeated: an expired token is not a denial."""
        c = self._client
        wait = ApprovalWait(c.approvals, refusal, c.clock.monotonic(), control_plane=c.issuer_url)
        refreshed = False
        while True:
            if not refreshed:
                c.sleep(wait.next_delay(c.clock.monotonic()))
            token = c.token_for(self._key, subject_token=self._subject)
            response = c.http.send(self._poll_request(wait, token))
            body = parse_body(response)
            if _expired(response, body) and not refreshed:
                c.tokens.discard(self._key, token.access_token)
                refreshed = True
                continue
            refreshed = False
            found = wait.interpret(response.status_code, body)
            if found is not None:
                return found

    # -- async -------------------------------------------------------------------------------

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        refuse_cleartext(request.url)
        self._admit(request)
        c = self._client
        token = await c.atoken_for(self._key, subject_token=self._subject)
        attempts, nonce, override = Attempts(), self._nonce_for(request), None
        while True:
            self._prepare(request, token, nonce, override)
            response = yield request
            if response.status_code >= 400:
                await response.aread()
            step = self._plan(request, response, attempts)
            if step.kind == "done":
                return
            if step.kind == "raise":
                assert step.error is not None
                raise step.error
            if step.kind == "refresh":
                c.tokens.discard(self._key, token.access_token)
                token = await c.atoken_for(self._key, subject_token=self._subject)
            elif step.kind == "nonce":
                nonce = self._keep_nonce(request, step.nonce)
            elif step.kind == "backoff":
                await c.asleep(step.delay)
                token = await c.atoken_for(self._key, subject_token=self._subject)
            elif step.kind == "approval":
                assert isinstance(step.error, ApprovalRequiredError)
                override = await self._wait_async(step.error, token)
                token = await c.atoken_for(self._key, subject_token=self._subject)

    async def _wait_async(self, refusal: ApprovalRequiredError, token: CachedToken) -> str:
        """:meth:`_wait_sync`, asynchronously."""
        c = self._client
        wait = ApprovalWait(c.approvals, refusal, c.clock.monotonic(), control_plane=c.issuer_url)
        refreshed = False
        while True:
            if not refreshed:
                await c.asleep(wait.next_delay(c.clock.monotonic()))
            token = await c.atoken_for(self._key, subject_token=self._subject)
            response = await c.ahttp.send(self._poll_request(wait, token))
            body = parse_body(response)
            if _expired(response, body) and not refreshed:
                c.tokens.discard(self._key, token.access_token)
                refreshed = True
                continue
            refreshed = False
            found = wait.interpret(response.status_code, body)
            if found is not None:
                return found


#: Servers whose nonces one auth keeps, at most (then it starts over).
_MAX_NONCES = 64
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _expired(response: httpx.Response, body: dict[str, object]) -> bool:
    return response.status_code == 401 and body.get("code") == "token_expired"


def origin_of(url: httpx.URL) -> str:
    """``scheme://host:port`` of ``url`` (the port empty when it is the scheme's default)."""
    return f"{url.scheme}://{url.host}:{url.port or ''}"


def proof_origin(proof: str) -> str | None:
    """The origin of the URL a DPoP proof was made for (its ``htu``), or None if unreadable."""
    try:
        segment = proof.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        return origin_of(httpx.URL(str(claims["htu"])))
    except (IndexError, ValueError, KeyError, TypeError, httpx.InvalidURL):
        return None


def refuse_cleartext(url: httpx.URL | str) -> None:
    """Credentials (a client secret, an assertion, a token, a proof, an override) travel over
    ``https`` only, or to this host's loopback (a local gateway or test server): over ``http``
    anyone on the path reads them, and a token with its proof is good for that call."""
    url = httpx.URL(url) if isinstance(url, str) else url
    if url.scheme != "https" and not (url.scheme == "http" and url.host in _LOOPBACK):
        raise ValueError(
            f"{url.scheme}://{url.host}: credentials are sent over https only (or to loopback); "
            "use an https URL"
        )


def default_sleep(seconds: float) -> None:
    time.sleep(seconds)


async def default_asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
