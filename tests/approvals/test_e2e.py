"""Human approvals end to end over real HTTP: control plane, gateway, tool server, and recording
servers standing in for Slack and Teams, each in its own uvicorn server on loopback.

A payment of 12,000 is held (approval_needed) → Slack gets a message with buttons → a correctly
signed Approve comes back → the agent polls its status URL and gets the override → the same call
retried with it goes through once → a second retry is refused. Also: deny, expiry, Teams, and the
tampering cases (unsigned, stale, changed body, reused override, changed amount)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from aegis.approvals import ApprovalService, build_approval_service
from aegis.approvals.signing import sign_v0
from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from tests.approvals.conftest import APPROVERS_YAML, Recorder
from tests.gateway.harness import AgentClient, Upstream, serve
from tests.gateway.helpers import mint_proof
from tests.support.server import RunningServer, free_port, run_server

pytestmark = pytest.mark.slow

SLACK_SECRET = "slack-signing-secret-for-tests"
TEAMS_KEY = base64.b64encode(b"t" * 32).decode()
POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: approvals-e2e}
spec:
  rules:
    - id: pay-small
      action: allow
      match: {tools: [payments]}
      when: {path: request.body.amount, lte: 10000}
    - id: pay-large
      action: approval_needed
      reason: payment above 10000
      match: {tools: [payments]}
      when: {path: request.body.amount, gt: 10000}
      approval: {group: finance, channel: slack, expires_in: 600}
    - id: crm-export
      action: approval_needed
      match: {tools: [crm]}
      approval: {group: finance, channel: teams, expires_in: 600}
"""


class OffsetClock:
    """The real clock plus an offset the test moves (to expire requests without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@dataclasses.dataclass
class Stack:
    srv: RunningServer
    gateway: str
    upstream: Upstream
    slack: Recorder
    teams: Recorder
    service: ApprovalService
    clock: OffsetClock
    audit: AuditLog


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    upstream, slack, teams = Upstream(), Recorder(), Recorder()
    with serve(upstream.app) as up, serve(slack.app) as slack_url, serve(teams.app) as teams_url:
        channels = (
            "  channels:\n"
            f"    slack: {{kind: slack, url: '{slack_url}/hook', secret: {SLACK_SECRET}}}\n"
            f"    teams: {{kind: teams, url: '{teams_url}/hook', secret: '{TEAMS_KEY}'}}\n"
        )
        directory = tmp_path_factory.mktemp("approvals")
        with run_server(directory, APPROVERS_YAML + channels) as srv:
            clock = OffsetClock()
            audit = AuditLog(srv.config.database_url(), clock=clock)
            service = build_approval_service(
                srv.config, clock=clock, keyring=srv.services.keyring,
                replay=srv.services.replay, audit=audit,
            )  # fmt: skip
            srv.services.extras["approvals"] = service  # shared by gateway and control plane
            settings = GatewaySettings.model_validate({"port": free_port(), "routes": [
                {"path_prefix": "/payments", "upstream": up, "tool": "payments",
                 "tenant": "acme", "env": "prod"},
                {"path_prefix": "/crm", "upstream": up, "tool": "crm",
                 "tenant": "acme", "env": "prod"},
            ]})  # fmt: skip
            policies = MemoryPolicyStore()
            version = policies.put(load_document(POLICY), now=time.time())
            policies.activate("acme", "prod", version, actor="test", now=time.time())
            pipeline = build_pipeline(srv.services, settings, policy_store=policies, audit=audit)
            app = create_gateway_app(srv.services, settings, pipeline=pipeline)
            with serve(app, settings.port) as gw:
                yield Stack(srv, gw, upstream, slack, teams, service, clock, audit)
            service.close()
            audit.close()


class Caller:
    def __init__(self, stack: Stack, name: str = "payer") -> None:
        self.stack, self.agent = stack, AgentClient(stack.srv, name)
        self.token = self.agent.access_token()

    def pay(self, amount: int, override: str | None = None, path: str = "/payments/charge",
            extra: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
        url = f"{self.stack.gateway}{path}"
        headers = {**self.agent.headers(self.token, "POST", url), **(extra or {})}
        if override is not None:
            headers["X-Aegis-Override"] = override
        return httpx.post(url, json={"amount": amount, "account": "DE00 1"}, headers=headers)

    def status(self, status_url: str) -> httpx.Response:
        proof = mint_proof(self.agent.key, "GET", status_url, token=self.token)
        return httpx.get(status_url, headers={"Authorization": f"DPoP {self.token}", "DPoP": proof})


def slack_click(stack: Stack, approval_id: str, action: str, user: str, *,
                ts: int | None = None, sign: bool = True, tamper: bool = False) -> httpx.Response:  # fmt: skip
    """What Slack sends when ``user`` presses a button, signed with the app's secret."""
    payload = {"type": "block_actions", "user": {"id": user, "name": user.lower()},
               "actions": [{"action_id": action, "value": approval_id}]}  # fmt: skip
    body = urlencode({"payload": json.dumps(payload)}).encode()
    stamp = str(ts if ts is not None else int(time.time()))
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if sign:
        headers["x-slack-request-timestamp"] = stamp
        headers["x-slack-signature"] = sign_v0(SLACK_SECRET.encode(), stamp, body)
    if tamper:
        body = body.replace(b"aegis_deny", b"aegis_approve")
    return httpx.post(f"{stack.srv.url}/approvals/slack/slack", content=body, headers=headers)


def held(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 403, resp.text
    body: dict[str, Any] = resp.json()
    assert body["code"] == "approval_needed"
    assert (
        body["status_url"]
        == f"{body['status_url'].split('/approvals/')[0]}/approvals/" + (body["approval_id"])
    )
    return body


def test_payment_approved_on_slack_goes_through_exactly_once(stack: Stack) -> None:
    caller = Caller(stack)
    first = held(caller.pay(12_000))
    assert held(caller.pay(12_000))["approval_id"] == first["approval_id"]  # same call, same id
    approval_id = first["approval_id"]
    (message,) = [m for m in stack.slack.wait(1) if approval_id in json.dumps(m)]
    buttons = next(b for b in message["blocks"] if b["type"] == "actions")["elements"]
    assert [b["action_id"] for b in buttons] == ["aegis_approve", "aegis_deny", "aegis_withdraw"]
    assert "confirm" in buttons[2]  # Slack asks before a withdrawal
    assert {b["value"] for b in buttons} == {approval_id}
    assert "hunter2" not in json.dumps(message)

    # Tampering with the callback: refused, audited, request still pending.
    assert slack_click(stack, approval_id, "aegis_approve", "UCAROL", sign=False).json()[
        "code"
    ] == ("callback_unsigned")
    stale = slack_click(stack, approval_id, "aegis_approve", "UCAROL", ts=int(time.time()) - 301)
    assert (stale.status_code, stale.json()["code"]) == (401, "callback_stale")
    changed = slack_click(stack, approval_id, "aegis_deny", "UCAROL", tamper=True)
    assert (changed.status_code, changed.json()["code"]) == (401, "callback_signature_invalid")
    outsider = slack_click(stack, approval_id, "aegis_approve", "UDAVE")
    assert outsider.json()["code"] == "approver_not_in_group"
    owner = slack_click(stack, approval_id, "aegis_approve", "UOWNER")
    assert owner.json()["code"] == "self_approval_forbidden"
    assert caller.status(first["status_url"]).json()["state"] == "pending"
    garbage = caller.pay(12_000, override="not-a-token")
    assert (garbage.status_code, garbage.json()["code"]) == (403, "override_invalid")

    ok = slack_click(stack, approval_id, "aegis_approve", "UCAROL")
    assert ok.status_code == 200, ok.text
    status = caller.status(first["status_url"]).json()
    assert status["state"] == "approved"
    override = status["override_token"]

    changed_amount = caller.pay(12_001, override=override)
    assert (changed_amount.status_code, changed_amount.json()["code"]) == (
        403, "override_digest_mismatch")  # fmt: skip
    # A header the upstream acts on, added after the approval: another call.
    redirected = caller.pay(12_000, override=override, extra={"x-destination": "external"})
    assert (redirected.status_code, redirected.json()["code"]) == (
        403, "override_digest_mismatch")  # fmt: skip
    thief = Caller(stack, "thief")
    stolen = thief.pay(12_000, override=override)
    assert stolen.json()["code"] == "override_agent_mismatch"

    seen = len(stack.upstream.seen)
    allowed = caller.pay(12_000, override=override)
    assert allowed.status_code == 200, allowed.text
    assert len(stack.upstream.seen) == seen + 1
    forwarded = stack.upstream.seen[-1]["headers"]
    assert "x-aegis-override" not in forwarded
    assert forwarded["x-aegis-agent-id"] == caller.agent.id
    again = caller.pay(12_000, override=override)
    assert (again.status_code, again.json()["code"]) == (403, "override_used")
    assert len(stack.upstream.seen) == seen + 1

    decided = [r for r in stack.audit.records(kind="approval.decided") if r["id"] == approval_id]
    assert [(r["approver"], r["channel"], r["decision"]) for r in decided] == [
        ("carol@example.com", "slack", "approved")]  # fmt: skip
    rejected = {r["code"] for r in stack.audit.records(kind="approval.rejected")}
    assert {"callback_unsigned", "callback_stale", "callback_signature_invalid",
            "approver_not_in_group", "self_approval_forbidden"} <= rejected  # fmt: skip


def test_denied_on_slack(stack: Stack) -> None:
    caller = Caller(stack, "denied")
    first = held(caller.pay(15_000))
    stack.slack.wait(1)
    resp = slack_click(stack, first["approval_id"], "aegis_deny", "UCAROL")
    assert resp.status_code == 200 and "denied" in resp.json()["text"]
    status = caller.status(first["status_url"]).json()
    assert status["state"] == "denied" and "override_token" not in status
    again = slack_click(stack, first["approval_id"], "aegis_approve", "UCAROL")
    assert (again.status_code, again.json()["code"]) == (409, "approval_decided")
    # The call itself is still held: asking again opens a new request.
    assert held(caller.pay(15_000))["approval_id"] != first["approval_id"]


def test_an_approval_withdrawn_on_slack_stops_its_override(stack: Stack) -> None:
    """Withdraw: only an approved request, only by someone who may decide it; its override is
    refused from then on, and the withdrawal is audited with who approved and who withdrew."""
    caller = Caller(stack, "withdrawn")
    first = held(caller.pay(13_000))
    approval_id = first["approval_id"]
    stack.slack.wait(1)
    early = slack_click(stack, approval_id, "aegis_withdraw", "UCAROL")
    assert (early.status_code, early.json()["code"]) == (409, "approval_decided")
    assert "deny it instead" in early.json()["message"]
    assert slack_click(stack, approval_id, "aegis_approve", "UCAROL").status_code == 200
    override = caller.status(first["status_url"]).json()["override_token"]
    outsider = slack_click(stack, approval_id, "aegis_withdraw", "UDAVE")
    assert (outsider.status_code, outsider.json()["code"]) == (403, "approver_not_in_group")
    owner = slack_click(stack, approval_id, "aegis_withdraw", "UOWNER")
    assert owner.json()["code"] == "self_approval_forbidden"
    assert caller.status(first["status_url"]).json()["state"] == "approved"

    seen = len(stack.upstream.seen)
    withdrawn = slack_click(stack, approval_id, "aegis_withdraw", "UCAROL")
    assert withdrawn.status_code == 200 and "denied" in withdrawn.json()["text"], withdrawn.text
    status = caller.status(first["status_url"]).json()
    assert status["state"] == "denied" and "override_token" not in status
    refused = caller.pay(13_000, override=override)
    assert (refused.status_code, refused.json()["code"]) == (403, "approval_denied")
    assert len(stack.upstream.seen) == seen
    again = slack_click(stack, approval_id, "aegis_withdraw", "UCAROL")
    assert (again.status_code, again.json()["code"]) == (409, "approval_decided")
    [record] = [r for r in stack.audit.records(kind="approval.withdrawn") if r["id"] == approval_id]
    assert (record["approver"], record["approved_by"], record["channel"]) == (
        "carol@example.com", "carol@example.com", "slack")  # fmt: skip


def test_expired_request_is_closed_and_audited(stack: Stack) -> None:
    caller = Caller(stack, "late")
    first = held(caller.pay(20_000))
    stack.clock.offset += 601
    try:
        assert caller.status(first["status_url"]).json()["state"] == "expired"
        late = slack_click(stack, first["approval_id"], "aegis_approve", "UCAROL")
        assert (late.status_code, late.json()["code"]) == (403, "approval_expired")
    finally:
        stack.clock.offset -= 601
    expired = [r["id"] for r in stack.audit.records(kind="approval.expired")]
    assert first["approval_id"] in expired


def test_teams_reply_approves_and_unsigned_replies_are_refused(stack: Stack) -> None:
    caller = Caller(stack, "exporter")
    first = held(caller.pay(1, path="/crm/export"))
    card = stack.teams.wait(1)[-1]
    assert card["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert first["approval_id"] in json.dumps(card)
    reply = json.dumps({"type": "message", "text": f"<at>Aegis</at> approve {first['approval_id']}"
                        " export for the audit", "from": {"aadObjectId": "aad-carol"}}).encode()  # fmt: skip
    url = f"{stack.srv.url}/approvals/teams/teams"
    unsigned = httpx.post(url, content=reply)
    assert (unsigned.status_code, unsigned.json()["code"]) == (401, "callback_unsigned")
    mac = hmac.new(base64.b64decode(TEAMS_KEY), reply, hashlib.sha256).digest()
    auth = "HMAC " + base64.b64encode(mac).decode()
    forged = httpx.post(url, content=reply + b" ", headers={"authorization": auth})
    assert forged.json()["code"] == "callback_signature_invalid"
    ok = httpx.post(url, content=reply, headers={"authorization": auth})
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    override = caller.status(first["status_url"]).json()["override_token"]
    assert caller.pay(1, override=override, path="/crm/export").status_code == 200
    decided = [r for r in stack.audit.records(kind="approval.decided")
               if r["id"] == first["approval_id"]]  # fmt: skip
    assert decided[0]["channel"] == "teams" and decided[0]["reason"] == "export for the audit"
    assert "withdraw " + first["approval_id"] in json.dumps(card)


def test_a_teams_reply_withdraws_an_unused_approval(stack: Stack) -> None:
    caller = Caller(stack, "unexported")
    first = held(caller.pay(1, path="/crm/export"))
    stack.teams.wait(1)
    url = f"{stack.srv.url}/approvals/teams/teams"

    def reply(verb: str, why: str) -> httpx.Response:
        body = json.dumps({"type": "message", "from": {"aadObjectId": "aad-carol"},
                           "text": f"<at>Aegis</at> {verb} {first['approval_id']} {why}"}).encode()  # fmt: skip
        mac = hmac.new(base64.b64decode(TEAMS_KEY), body, hashlib.sha256).digest()
        return httpx.post(url, content=body,
                          headers={"authorization": "HMAC " + base64.b64encode(mac).decode()})  # fmt: skip

    assert reply("approve", "fine").status_code == 200
    override = caller.status(first["status_url"]).json()["override_token"]
    taken_back = reply("withdraw", "wrong customer list")
    assert taken_back.status_code == 200 and "denied" in taken_back.json()["text"]
    refused = caller.pay(1, override=override, path="/crm/export")
    assert (refused.status_code, refused.json()["code"]) == (403, "approval_denied")
    [record] = [r for r in stack.audit.records(kind="approval.withdrawn")
                if r["id"] == first["approval_id"]]  # fmt: skip
    assert (record["channel"], record["reason"]) == ("teams", "wrong customer list")


def test_signed_callbacks_for_unknown_ids_or_garbage_are_refused_and_audited(stack: Stack) -> None:
    unknown = slack_click(stack, "apr_doesnotexist", "aegis_approve", "UCAROL")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "approval_not_found")
    body = b"payload=%7B%22type%22%3A%22view_submission%22%7D"
    stamp = str(int(time.time()))
    headers = {"x-slack-request-timestamp": stamp,
               "x-slack-signature": sign_v0(SLACK_SECRET.encode(), stamp, body),
               "content-type": "application/x-www-form-urlencoded"}  # fmt: skip
    garbage = httpx.post(f"{stack.srv.url}/approvals/slack/slack", content=body, headers=headers)
    assert (garbage.status_code, garbage.json()["code"]) == (400, "invalid_request")
    wrong_kind = httpx.post(f"{stack.srv.url}/approvals/slack/teams", content=body, headers=headers)
    assert wrong_kind.json()["code"] == "not_found"
    codes = [r["code"] for r in stack.audit.records(kind="approval.rejected")]
    assert "approval_not_found" in codes and "invalid_request" in codes


def test_status_url_needs_the_agents_own_token(stack: Stack, tmp_path: Path) -> None:
    caller = Caller(stack, "poller")
    first = held(caller.pay(30_000))
    assert httpx.get(first["status_url"]).json()["code"] == "unauthenticated"
    other = Caller(stack, "nosy")
    assert other.status(first["status_url"]).json()["code"] == "approval_not_found"
    no_proof = httpx.get(first["status_url"], headers={"Authorization": f"DPoP {caller.token}"})
    assert no_proof.json()["code"] == "invalid_token"
    # A certificate-bound token of the same agent, sent without its certificate: refused, as
    # the gateway refuses it (a stolen bound token must not read the override either).
    verified = stack.srv.services.verifier.verify(caller.token)
    bound = stack.srv.services.issuer.issue(
        agent_id=verified.agent_id, client_id=verified.client_id, tenant=verified.tenant,
        env=verified.env, scopes=verified.scopes, audience=verified.aud, lifetime=60,
        cnf={"x5t#S256": "A" * 43},
    ).token  # fmt: skip
    unbound = httpx.get(first["status_url"], headers={"Authorization": f"Bearer {bound}"})
    assert (unbound.status_code, unbound.json()["code"]) == (401, "invalid_token"), unbound.text


def test_approvers_see_a_form_body_and_are_told_of_a_body_they_cannot_see(stack: Stack) -> None:
    """A body policy did not parse is never shown as null (what a call without a body shows):
    a form's fields are shown, anything else is marked as not shown, with its type and digest."""
    agent = AgentClient(stack.srv, "former")
    token = agent.access_token()
    url = f"{stack.gateway}/crm/export"

    def hold(content: bytes, ctype: str) -> dict[str, Any]:
        headers = {**agent.headers(token, "POST", url), "content-type": ctype}
        approval_id = held(httpx.post(url, content=content, headers=headers))["approval_id"]
        [record] = [r for r in stack.audit.records(kind="approval.requested")
                    if r["id"] == approval_id]  # fmt: skip
        return record  # type: ignore[no-any-return]

    form = hold(b"to=ATTACKER-IBAN&amount=9999999&to=x&api_key=s3cr3t",
                "application/x-www-form-urlencoded")  # fmt: skip
    assert form["parameters"] == {
        "form": {"to": ["ATTACKER-IBAN", "x"], "amount": "9999999", "api_key": "[redacted]"}
    }
    blob = hold(b"\x00\x01binary", "application/octet-stream")
    assert blob["parameters"] == {"body_not_shown": {
        "content_type": "application/octet-stream",
        "digest": "sha256:" + hashlib.sha256(b"\x00\x01binary").hexdigest(),
    }}  # fmt: skip


def _approved(stack: Stack, caller: Caller, path: str = "/payments/charge",
              host: str | None = None) -> str:  # fmt: skip
    """An override for ``caller``'s payment of 12,000 to ``path``, approved on Slack."""
    first = held(_pay(stack, caller, path=path, host=host))
    stack.slack.wait(1)
    click = slack_click(stack, first["approval_id"], "aegis_approve", "UCAROL")
    assert click.status_code == 200, click.text
    return str(caller.status(first["status_url"]).json()["override_token"])


def _pay(stack: Stack, caller: Caller, *, path: str = "/payments/charge", host: str | None = None,
         override: str | None = None, extra: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
    """A payment of 12,000 sent to the gateway, addressed to ``host`` when given."""
    authority = host or stack.gateway.split("://", 1)[1]
    headers = {**caller.agent.headers(caller.token, "POST", f"http://{authority}{path}"),
               **(extra or {}), "host": authority}  # fmt: skip
    if override is not None:
        headers["X-Aegis-Override"] = override
    return httpx.post(f"{stack.gateway}{path}", json={"amount": 12_000, "account": "DE00 1"},
                      headers=headers)  # fmt: skip


def test_an_approved_call_reaches_the_upstream_without_the_fields_it_is_not_bound_to(
    stack: Stack,
) -> None:
    """Tracing and proxy fields are not bound (they differ between two sendings), so they must
    not reach the upstream either: an x-envoy-retry-on added after the approval would make a
    sidecar run the approved payment ten times."""
    caller = Caller(stack, "retrier")
    override = _approved(stack, caller)
    added = {"x-envoy-retry-on": "5xx,reset", "x-envoy-max-retries": "10",
             "baggage": "dry_run=false", "uberctx-account": "other", "x-request-id": "r-1",
             "user-agent": "changed", "x_request_id": "r-2", "proxy_target": "evil.example",
             "proxy": "http://evil.example"}  # fmt: skip
    seen = len(stack.upstream.seen)
    resp = _pay(stack, caller, override=override, extra=added)
    assert resp.status_code == 200, resp.text
    forwarded = stack.upstream.seen[seen]["headers"]
    assert not set(added) & set(forwarded), forwarded
    assert forwarded["x-aegis-agent-id"] == caller.agent.id


@pytest.mark.parametrize(
    ("approved", "sent"),
    [("/payments/accounts/ACME%3Bx/charge", "/payments/accounts/ACME;x/charge"),
     ("/payments/accounts/ACME;x/charge", "/payments/accounts/ACME%3Bx/charge")],
)  # fmt: skip
def test_an_override_is_bound_to_the_target_as_sent(stack: Stack, approved: str, sent: str) -> None:
    """``%3B`` and ``;`` decode alike, but Tomcat and Spring read only ``;`` as the start of
    path parameters (account ``ACME``, not ``ACME;x``): the upstream receives the bytes."""
    caller = Caller(stack, "matrix" + str(len(approved)))
    override = _approved(stack, caller, path=approved)
    other = _pay(stack, caller, path=sent, override=override)
    assert (other.status_code, other.json()["code"]) == (403, "override_digest_mismatch")
    assert _pay(stack, caller, path=approved, override=override).status_code == 200


def test_an_override_is_bound_to_the_host_as_sent(stack: Stack) -> None:
    """The upstream receives the Host as sent (X-Forwarded-Host), port and all."""
    caller = Caller(stack, "hosty")
    override = _approved(stack, caller)
    moved = _pay(stack, caller, host="127.0.0.1:1", override=override)
    assert (moved.status_code, moved.json()["code"]) == (403, "override_digest_mismatch")
    assert _pay(stack, caller, override=override).status_code == 200
