"""Approval routes outside the admin API: the status URL agents poll and the Slack / Teams callbacks.

* ``GET /approvals/{id}``: the agent whose call is held polls its request with its own access
  token (``Authorization: Bearer|DPoP <token>``; signature, claims and subject state are checked,
  and a DPoP-bound token needs a fresh proof for the status URL).
  Another agent's or an unknown id is ``approval_not_found``. Once approved, the answer carries the
  override token (the same single use however often it is fetched).
* ``POST /approvals/slack/{channel}``: Slack's interactive callback (``block_actions``: Approve,
  Deny, or Withdraw an approval whose override is unused), verified with the channel's signing
  secret (v0 HMAC, five-minute window) before anything is read.
* ``POST /approvals/teams/{channel}``: a Teams outgoing-webhook reply
  ``approve|deny|withdraw <id> [why]``, verified with the channel's HMAC key.

A callback that fails verification is refused (401 with its code) and audited; the request's state
is unchanged. Bodies are capped at ``server.max_body_bytes``.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, Final
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegis.approvals.directory import Via
from aegis.approvals.model import ApprovalRequest
from aegis.approvals.service import ApprovalService
from aegis.approvals.signing import verify_slack, verify_teams
from aegis.approvals.wiring import approvals_for
from aegis.errors import AegisError, ClientAuthError, InvalidRequest, TokenError
from aegis.gateway.evidence import count_refusal
from aegis.pki.binding import X5T_S256, check_certificate_binding
from aegis.pki.middleware import peer_from_scope
from aegis.server.services import Services
from aegis.tokens.claims import AccessToken
from aegis.tokens.dpop import DpopVerifier
from aegis.tokens.subject import check_subject

__all__ = ["approval_routes"]

#: What each Slack button (``action_id``) and Teams reply verb does with a request.
_SLACK_ACTIONS: Final = {"aegis_approve": "approve", "aegis_deny": "deny",
                         "aegis_withdraw": "withdraw"}  # fmt: skip
_TEAMS_TEXT = re.compile(
    r"^\s*(approve|deny|withdraw)\s+(apr_[A-Za-z0-9_-]{1,64})\s*(.*)$", re.DOTALL
)
_MENTION = re.compile(r"<at>.*?</at>")


def _error(exc: AegisError) -> JSONResponse:
    return JSONResponse(
        exc.to_dict(), status_code=exc.status, headers={"cache-control": "no-store"}
    )


class _Handlers:
    def __init__(self, services: Services) -> None:
        self._services = services

    @property
    def service(self) -> ApprovalService:
        return approvals_for(self._services)

    async def _body(self, request: Request) -> bytes:
        limit = self._services.config.server.max_body_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise AegisError(
                    f"request body larger than {limit} bytes", code="payload_too_large"
                )
        return bytes(body)

    def _secret(self, channel: str, kind: str) -> bytes:
        found = self._services.config.approvals.channels.get(channel)
        if found is None or found.kind != kind:
            # The name is the caller's: not echoed (nor written to the audit log whole).
            raise AegisError(f"no such {kind} approval channel", code="not_found")
        return found.secret_bytes(str(self._services.config.path(".")), channel)

    async def status(self, request: Request) -> Response:
        try:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() not in ("bearer", "dpop") or not token.strip():
                raise ClientAuthError("send the agent's access token", code="unauthenticated")
            approval_id = request.path_params["approval_id"]
            at = self._services.verifier.verify(token.strip())
            await self._proof(request, scheme, token.strip(), at, approval_id)
            await check_subject(at, self._services.cache, self._services.revocation)
            out = await self.service.status(approval_id, at.agent_id)
        except AegisError as exc:
            # The URL an override is fetched from: refusals there (a forged or replayed
            # credential, another agent guessing ids) are counted and audited like any other.
            count_refusal(exc)
            with contextlib.suppress(AegisError):
                await self.service.reject_status(exc, request.path_params.get("approval_id"))
            return _error(exc)
        return JSONResponse(out, headers={"cache-control": "no-store"})

    async def _proof(
        self, request: Request, scheme: str, token: str, at: AccessToken, approval_id: str
    ) -> None:
        """A DPoP-bound token polls with a fresh proof for the status URL (RFC 9449 §7.1); a
        certificate-bound one over a connection with its certificate (RFC 8705 §3), as at the
        gateway: a stolen bound token must not read the override either."""
        if (at.cnf or {}).get(X5T_S256) is not None:
            check_certificate_binding(at, peer_from_scope(request.scope))
        jkt = (at.cnf or {}).get("jkt")
        if jkt is None:
            return
        proofs = request.headers.getlist("dpop")
        if scheme.lower() != "dpop" or len(proofs) != 1:
            raise TokenError("this token is DPoP-bound; send one DPoP proof", code="invalid_token")
        dpop = self._services.extras.get("dpop_verifier")
        if not isinstance(dpop, DpopVerifier):  # never skip the check: refuse
            raise AegisError("no DPoP verifier is configured", code="server_error")
        url = self.service.status_url(approval_id)
        proof = dpop.verify(proofs[0], method="GET", url=url, access_token=token, jkt=str(jkt))
        await dpop.consume(proof)

    async def _act(
        self, approval_id: str, verb: str, *, via: Via, user: str, reason: str
    ) -> ApprovalRequest:
        """A verified callback's decision: approve, deny, or withdraw an approval whose
        override is unused, with the same checks as the admin API and the CLI."""
        if verb == "withdraw":
            return await self.service.withdraw(approval_id, via=via, credential=user, reason=reason)
        return await self.service.decide(
            approval_id, via=via, credential=user, approve=verb == "approve", reason=reason
        )

    async def slack(self, request: Request) -> Response:
        via: Via = "slack"
        try:
            try:  # every refusal before the decision is audited, an unknown channel too
                secret = self._secret(request.path_params["channel"], "slack")
                body = await self._body(request)
                verify_slack(
                    secret,
                    timestamp=request.headers.get("x-slack-request-timestamp"),
                    signature=request.headers.get("x-slack-signature"),
                    body=body,
                    now=self._services.clock.now(),
                )
                approval_id, verb, user = _slack_action(body)
            except AegisError as exc:
                await self.service.reject_callback(exc, via)
            req = await self._act(approval_id, verb, via=via, user=user, reason="slack button")
        except AegisError as exc:
            return _error(exc)
        return JSONResponse({"text": f"Aegis: request {req.id} {req.state} by {req.decided_by}"})

    async def teams(self, request: Request) -> Response:
        via: Via = "teams"
        try:
            try:  # every refusal before the decision is audited, an unknown channel too
                secret = self._secret(request.path_params["channel"], "teams")
                body = await self._body(request)
                verify_teams(secret, authorization=request.headers.get("authorization"), body=body)
                approval_id, verb, user, why = _teams_reply(body)
            except AegisError as exc:
                await self.service.reject_callback(exc, via)
            req = await self._act(approval_id, verb, via=via, user=user, reason=why)
        except AegisError as exc:
            return _error(exc)
        text = f"Aegis: request {req.id} {req.state} by {req.decided_by}"
        return JSONResponse({"type": "message", "text": text})


def _slack_action(body: bytes) -> tuple[str, str, str]:
    """``(approval id, verb, Slack user id)`` from a verified ``block_actions`` payload."""
    try:
        payload: Any = json.loads(parse_qs(body.decode("utf-8"), strict_parsing=True)["payload"][0])
        action = payload["actions"][0]
        verb = _SLACK_ACTIONS[action["action_id"]]
        approval_id, user = action["value"], payload["user"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise InvalidRequest("not an Aegis approval action from Slack") from None
    if not isinstance(approval_id, str) or not isinstance(user, str):
        raise InvalidRequest("not an Aegis approval action from Slack")
    return approval_id, verb, user


def _teams_reply(body: bytes) -> tuple[str, str, str, str]:
    """``(approval id, verb, Teams user, why)`` from a verified outgoing-webhook message."""
    try:
        payload: Any = json.loads(body)
        text, user = payload["text"], payload["from"]["aadObjectId"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("not a Teams message") from None
    match = _TEAMS_TEXT.match(_MENTION.sub("", str(text))) if isinstance(user, str) else None
    if match is None:
        raise InvalidRequest(
            "reply 'approve <id> <why>', 'deny <id> <why>' or 'withdraw <id> <why>'"
        )
    return match[2], match[1], str(user), match[3].strip()


def approval_routes(services: Services) -> list[Route]:
    h = _Handlers(services)
    return [
        Route("/approvals/slack/{channel}", h.slack, methods=["POST"]),
        Route("/approvals/teams/{channel}", h.teams, methods=["POST"]),
        Route("/approvals/{approval_id}", h.status, methods=["GET"]),
    ]
