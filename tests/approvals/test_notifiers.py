"""Notifications over real HTTP to recording servers: the message shapes, the HMAC on generic
webhooks, retries with back-off, and failures recorded on the request and in metrics."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

from aegis.approvals.model import ApprovalRequest
from aegis.approvals.notifiers import message_for
from aegis.approvals.signing import sign_v0
from aegis.telemetry.metrics import REGISTRY
from tests.approvals.conftest import FINANCE, Recorder, Setup, held, make_setup
from tests.gateway.harness import serve
from tests.support.server import free_port


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def _with_channel(tmp_path: Path, kind: str, url: str, secret: str) -> Setup:
    return make_setup(tmp_path, f"  channels:\n    slack: {{kind: {kind}, url: '{url}', "
                                f"secret: '{secret}'}}\n")  # fmt: skip


async def test_webhook_is_signed_and_retried_until_delivered(tmp_path: Path) -> None:
    rec = Recorder(fail_first=2)
    with serve(rec.app) as url:
        s = _with_channel(tmp_path, "webhook", f"{url}/aegis", "hook-secret")
        before = metric("aegis_approval_notifications_total", kind="webhook", outcome="retried")
        req = await s.service.hold(held(), FINANCE)
        await s.service.drain()
        s.service.close()
    assert len(rec.calls) == 3
    last = rec.calls[-1]
    ts, sig = last["headers"]["x-aegis-timestamp"], last["headers"]["x-aegis-signature"]
    assert sig == sign_v0(b"hook-secret", ts, last["body"])
    doc = rec.messages()[-1]
    assert doc["type"] == "aegis.approval_requested"
    assert doc["request"]["approval_id"] == req.id
    assert doc["request"]["parameters"]["password"] == "[redacted]"
    assert doc["request"]["status_url"].endswith(f"/approvals/{req.id}")
    assert metric("aegis_approval_notifications_total", kind="webhook", outcome="retried") == (
        before + 2
    )
    stored = s.service.store.get(req.id)
    assert stored is not None
    assert (stored.notify_state, stored.notify_attempts) == ("delivered", 3)


async def test_undeliverable_message_is_recorded_not_dropped(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/nothing-listens"
    s = _with_channel(tmp_path, "slack", dead, "x")
    before = metric("aegis_approval_notifications_total", kind="slack", outcome="failed")
    req = await s.service.hold(held(), FINANCE)
    await s.service.drain()
    stored = s.service.store.get(req.id)
    assert stored is not None
    assert (stored.notify_state, stored.notify_attempts) == ("failed", 3)
    assert stored.notify_error
    assert stored.state == "pending"  # still decidable through the API or the CLI
    assert metric("aegis_approval_notifications_total", kind="slack", outcome="failed") == (
        before + 1
    )
    (record,) = s.audited("approval.notified")
    assert record["state"] == "failed"
    s.service.close()


async def test_slack_message_has_buttons_and_teams_a_card(tmp_path: Path) -> None:
    slack, teams = Recorder(), Recorder(fail_first=1)
    with serve(slack.app) as s_url, serve(teams.app) as t_url:
        key = base64.b64encode(b"k" * 32).decode()
        s = make_setup(tmp_path, "  channels:\n"
                       f"    slack: {{kind: slack, url: '{s_url}/x', secret: s}}\n"
                       f"    teams: {{kind: teams, url: '{t_url}/x', secret: '{key}'}}\n")  # fmt: skip
        a = await s.service.hold(held(), FINANCE)
        b = await s.service.hold(held(tool="crm"), FINANCE.__class__("finance", "teams", 600))
        await s.service.drain()
        s.service.close()
    (msg,) = slack.messages()
    actions = next(b for b in msg["blocks"] if b["type"] == "actions")
    assert actions["type"] == "actions"
    assert [e["value"] for e in actions["elements"]] == [a.id, a.id, a.id]
    cards = teams.messages()
    assert len(cards) == 2  # the first attempt failed and was retried
    assert b.id in str(cards[-1]) and "approve " + b.id in str(cards[-1])
    assert "withdraw " + b.id in str(cards[-1])


_BASE = ApprovalRequest(
    id="apr_1", state="pending", tenant="acme", env="prod", agent_id="payer",
    agent_owner="o@example.com", tool="payments", method="POST", path="/payments/charge",
    digest="sha256:" + "aa" * 32, parameters={"amount": 5}, rule_ids=("pay-large",),
    group="finance", channel="slack", created_at=0.0, expires_at=600.0, decision_id="d1",
    query=(("to", "acct-9"),), headers=(("x-payment-mode", "instant"),),
)  # fmt: skip


def _request(**over: Any) -> ApprovalRequest:
    return dataclasses.replace(_BASE, **over)


def _slack_sections(req: ApprovalRequest) -> list[str]:
    msg = message_for("slack", req, "https://aegis.example/approvals/apr_1")
    return [b["text"]["text"] for b in msg["blocks"] if b["type"] == "section"]


def test_a_slack_message_shows_the_query_and_headers_as_text_not_markup() -> None:
    """The path, query and headers are the caller's: Slack must show them as they are, not as
    links, mentions or the end of the code block."""
    req = _request(path="/payments/<https://evil.example|approve>",
                   parameters={"memo": "```<!channel>"})  # fmt: skip
    header, fields, params = _slack_sections(req)
    assert "&lt;https://evil.example|approve&gt;" in header and "<https" not in header
    assert 'query "to": "acct-9"' in fields and 'header x-payment-mode: "instant"' in fields
    assert "&lt;!channel&gt;" in params and params.count("```") == 2
    webhook = message_for("webhook", req, "https://aegis.example/approvals/apr_1")["request"]
    assert webhook["query"] == [["to", "acct-9"]]


def test_a_value_cannot_make_up_a_line_of_its_own() -> None:
    """A newline or ``&`` in a value stays inside that value's quotes: the approver does not
    see an ``amount=10`` that is not a field of the call."""
    req = _request(query=(("to", "acct-1\n?amount=10&amount=1000000"),))
    (fields,) = [s for s in _slack_sections(req) if "acct-1" in s]
    lines = fields.strip("`").splitlines()
    assert lines[0] == 'query "to": "acct-1\\n?amount=10&amp;amount=1000000"'
    teams = json.dumps(message_for("teams", req, "https://aegis.example/approvals/apr_1"))
    assert "acct-1\\\\n?amount" in teams


def test_what_does_not_fit_is_announced_and_slack_sections_stay_within_its_limit() -> None:
    """Slack refuses a whole message with a section over 3,000 characters, and escaping makes
    text longer: each section is cut by whole lines after escaping, and the cut is announced."""
    memos = [(f"memo{i}", "x" * 256) for i in range(6)]
    req = _request(
        query=(*memos, ("amount", "1000000")),
        headers=(("x-http-mode", "y" * 256),) * 8,  # 15 lines of ~270 characters: too many
        parameters={"memo": "<" * 1000},  # 4,000 characters once escaped
    )
    header, fields, params = _slack_sections(req)
    assert max(len(header), len(fields), len(params)) <= 3000
    assert 'query "amount": "1000000"' in fields  # the query comes first and fits whole
    shown = fields.count("header x-http-mode")
    assert 0 < shown < 8
    assert f"{8 - shown} more lines not shown: aegis approvals show apr_1" in fields
    assert "more lines not shown" in params  # the 4,000-character memo line


def test_a_teams_card_shows_the_callers_text_without_markdown() -> None:
    req = _request(query=(("memo", "[Approve now](https://evil.example/approve)"),))
    card = message_for("teams", req, "https://aegis.example/approvals/apr_1")
    body = card["attachments"][0]["content"]["body"]
    markdown = [b["text"] for b in body if b["type"] == "TextBlock"]
    assert not any("evil.example" in text for text in markdown)
    runs = [i["text"] for b in body if b["type"] == "RichTextBlock" for i in b["inlines"]]
    assert any("[Approve now](https://evil.example/approve)" in text for text in runs)


def test_a_long_path_is_cut_with_a_mark_in_slack_and_teams() -> None:
    req = _request(path="/payments/" + "x" * 493 + "/refund-all-accounts")
    header = _slack_sections(req)[0]
    assert "more characters)" in header and "refund-all-accounts" not in header
    teams = json.dumps(message_for("teams", req, "https://aegis.example/approvals/apr_1"))
    assert "more characters)" in teams


def test_approvers_see_a_callers_layout_characters_as_escapes() -> None:
    """A line separator (U+2028) or a bidi control in a value would draw lines or reorder text
    of the caller's choosing in Slack or Teams: shown as escapes, one JSON member a line."""
    from aegis.approvals.notifiers import json_lines, request_lines

    lines = json_lines({"memo": "ok\u2028 \u02baamount\u02ba: 12", "amount": 50000})
    assert lines == ["{", ' "memo": "ok\\u2028 \u02baamount\u02ba: 12",', ' "amount": 50000', "}"]
    assert request_lines((("to", "acct\u202eLIVE"),), ()) == ['query "to": "acct\\u202eLIVE"']


def test_a_long_body_is_shown_with_its_strings_cut_not_hidden() -> None:
    from aegis.approvals.model import redact_parameters

    shown = redact_parameters({"amount": 50000, "to": "acct-EVIL", "note": "x" * 5000})
    assert shown["amount"] == 50000 and shown["to"] == "acct-EVIL"
    assert shown["note"].endswith("(4744 more characters not shown)")
    many = redact_parameters({f"k{i}": {"deep": "y" * 200} for i in range(40)} | {"amount": 1})
    assert many["truncated"] and many["members"]["amount"] == 1
    assert many["members"]["k0"] == "(dict not shown)"
    assert redact_parameters([{f"m{i}": i for i in range(60)}] * 100) == {"truncated": True}


def test_slack_and_teams_show_where_and_for_whom_the_call_is_made() -> None:
    """The same call in prod for one user and in staging for another are two approvals: each
    message names the tenant, the environment, the origin user, the delegation chain and the
    policy's reasons, the caller's text escaped as any other."""
    prod = _request(env="prod", origin_user="alice@example.com", chain=("orchestrator",),
                    reasons=("payment above 5000 needs finance approval",),
                    origin_iss="https://idp-a.example")  # fmt: skip
    staging = _request(env="staging", origin_user="<!channel> bob`", chain=())
    header = _slack_sections(prod)[0]
    for shown in ("tenant: `acme`", "env: `prod`",
                  "on behalf of: `alice@example.com (of https://idp-a.example)`",
                  "delegated by: `orchestrator`", "needs finance approval"):  # fmt: skip
        assert shown in header, header
    other = _slack_sections(staging)[0]
    assert "env: `staging`" in other and "&lt;!channel&gt; bob`\u200b" in other
    assert "delegated by" not in other
    for req, who in ((prod, "alice@example.com (of https://idp-a.example)"),
                     (staging, "<!channel> bob`")):  # fmt: skip
        card = message_for("teams", req, "https://aegis.example/approvals/apr_1")
        body = card["attachments"][0]["content"]["body"]
        runs = "\n".join(i["text"] for b in body if b["type"] == "RichTextBlock"
                         for i in b["inlines"])  # fmt: skip
        assert f"env: {req.env}" in runs and f"on behalf of: {who}" in runs
        assert "tenant: acme" in runs
