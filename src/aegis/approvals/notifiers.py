"""Announcing approval requests where approvers work: Slack, Microsoft Teams, generic webhooks.

* Slack: an incoming-webhook message (Block Kit) with *Approve*, *Deny* and *Withdraw approval*
  buttons whose ``action_id`` is ``aegis_approve`` / ``aegis_deny`` / ``aegis_withdraw`` and whose
  ``value`` is the approval id; the press comes back to ``/approvals/slack/<channel>`` signed by
  Slack (:mod:`.signing`). Withdraw (after an approval whose override is unused) asks Slack's
  confirmation dialog first.
* Teams: an incoming-webhook card (Adaptive Card) with the request and the replies that decide it
  (``approve <id> <why>`` / ``deny <id> <why>``, later ``withdraw <id> <why>``) sent to the Aegis
  outgoing webhook, whose calls come back to ``/approvals/teams/<channel>`` with Teams' HMAC.
* Webhook: the request as JSON, signed ``X-Aegis-Signature: v0=<hex>`` over ``v0:<ts>:<body>``.

Delivery is retried with exponential back-off (``approvals.delivery_attempts``, first pause
``delivery_backoff``, doubling) on network errors and any non-2xx answer; the outcome (delivered
or failed, attempts, last error) is written to the request and counted in
``aegis_approval_notifications_total``: a message is never dropped silently.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from aegis.approvals.model import ApprovalRequest
from aegis.approvals.signing import sign_v0
from aegis.clock import Clock
from aegis.config import ApprovalChannel
from aegis.telemetry.metrics import APPROVAL_NOTIFICATIONS

__all__ = ["Delivery", "Notifier", "message_for"]


@dataclass(frozen=True, slots=True)
class Delivery:
    state: str  # delivered | failed
    attempts: int
    error: str | None = None


def _summary(req: ApprovalRequest, status_url: str) -> dict[str, Any]:
    return {
        "approval_id": req.id,
        "agent_id": req.agent_id,
        "tool": req.tool,
        "tenant": req.tenant,
        "env": req.env,
        "method": req.method,
        "path": req.path,
        "query": [list(pair) for pair in req.query],
        "headers": [list(pair) for pair in req.headers],
        "parameters": req.parameters,
        "rule": req.rule,
        "reasons": list(req.reasons),
        "group": req.group,
        "origin_user": req.origin_user,
        "origin_iss": req.origin_iss,
        "chain": list(req.chain),
        "expires_at": int(req.expires_at),
        "status_url": status_url,
    }


def _visible(text: str) -> str:
    """``text`` with every character that can break, reorder or hide what follows it (line and
    paragraph separators, bidi and zero-width controls, C0 and C1 controls) written as a
    ``\\uXXXX`` escape: an approver reads the characters the caller sent, not a layout they
    chose. Newlines are kept (the message's own lines are split on them only)."""
    return "".join(
        f"\\u{ord(c):04x}" if c != "\n" and unicodedata.category(c) in _INVISIBLE else c
        for c in text
    )


_INVISIBLE: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def json_lines(value: Any) -> list[str]:
    """``value`` as indented JSON, one line per member, split on newlines only (JSON escapes
    those inside strings), invisible and layout characters made visible."""
    return _visible(json.dumps(value, indent=1, ensure_ascii=False)).split("\n")


def request_lines(query: Any, headers: Any) -> list[str]:
    """The query and the bound headers, one field a line, each value JSON-quoted: a newline, a
    ``&`` or a quote in a caller's value cannot make up a line or a field of its own."""
    quoted = [f"query {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
              for k, v in query]  # fmt: skip
    lines = quoted + [f"header {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in headers]
    return [_visible(line) for line in lines]


def _fit(lines: list[str], limit: int, more: str) -> str:
    """Whole lines up to ``limit`` characters, then a line saying how many were left out (never
    a silent cut: an approver must know there is more than the message shows)."""
    out: list[str] = []
    used = 0
    for i, line in enumerate(lines):
        if used + len(line) + 1 > limit - len(more) - 40:
            out.append(f"… {len(lines) - i} more lines not shown: {more}")
            break
        out.append(line)
        used += len(line) + 1
    return "\n".join(out)


def _cut(text: str, limit: int) -> str:
    """``text`` up to ``limit`` characters, and a visible mark where it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


#: Slack refuses a section whose text is longer than 3,000 characters (the whole message then).
_SLACK_SECTION: Final = 3000
#: Characters of a caller's text in one Teams text block.
_TEAMS_TEXT: Final = 4000


def _mrkdwn(text: object) -> str:
    """``text`` shown as itself in Slack mrkdwn: ``&``, ``<`` and ``>`` escaped as Slack asks
    (a caller's path or parameter could otherwise carry a link or an @-mention into the
    approver's message) and backticks kept from closing a code span."""
    escaped = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("`", "`\u200b")


def _slack_code(lines: list[str], more: str) -> dict[str, Any]:
    """A section showing ``lines`` in a code block, escaped, within Slack's length limit."""
    body = _fit([_mrkdwn(line) for line in lines], _SLACK_SECTION - 6, _mrkdwn(more))
    return {"type": "section", "text": {"type": "mrkdwn", "text": f"```{body}```"}}


#: Slack's confirmation dialog before a withdrawal (Block Kit ``confirm`` object).
_WITHDRAW_CONFIRM: Final = {
    "title": {"type": "plain_text", "text": "Withdraw this approval?"},
    "text": {"type": "plain_text", "text": "The request becomes denied and its override token "
             "stops working, unless the agent has already used it."},
    "confirm": {"type": "plain_text", "text": "Withdraw"},
    "deny": {"type": "plain_text", "text": "Keep it"},
}  # fmt: skip


def _context(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Where and for whom the call is made, as approvers must read it: the same call in
    ``staging`` for one user and in ``prod`` for another are two different approvals. The
    origin user comes from the caller's token: shown escaped and cut like any caller text."""
    out = [("tenant", s["tenant"]), ("env", s["env"])]
    if s["origin_user"]:
        user = _cut(_visible(s["origin_user"]), 256)
        if s.get("origin_iss"):
            user += f" (of {_cut(_visible(s['origin_iss']), 256)})"
        out.append(("on behalf of", user))
    if s["chain"]:
        out.append(("delegated by", " → ".join(s["chain"])))
    if s["reasons"]:
        out.append(("policy", _cut(_visible("; ".join(s["reasons"])), 512)))
    return out


def _slack(s: dict[str, Any]) -> dict[str, Any]:
    context = "\n".join(f"{name}: `{_mrkdwn(value)}`" for name, value in _context(s))
    text = (
        f"*Approval needed* ({_mrkdwn(s['rule'])}): agent `{_mrkdwn(s['agent_id'])}` calls "
        f"`{_mrkdwn(s['tool'])}` {_mrkdwn(s['method'])} {_mrkdwn(_cut(_visible(s['path']), 512))} — group "
        f"*{_mrkdwn(s['group'])}*\n{context}"
    )
    more = f"aegis approvals show {s['approval_id']}"
    fields = request_lines(s["query"], s["headers"]) or ["(no query or headers)"]
    params = json_lines(s["parameters"])
    button = {"type": "button", "value": s["approval_id"]}
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            _slack_code(fields, more),
            _slack_code(params, more),
            {
                "type": "actions",
                "block_id": f"aegis:{s['approval_id']}",
                "elements": [
                    button
                    | {
                        "action_id": "aegis_approve",
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve"},
                    },
                    button
                    | {
                        "action_id": "aegis_deny",
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Deny"},
                    },
                    button
                    | {
                        "action_id": "aegis_withdraw",
                        "text": {"type": "plain_text", "text": "Withdraw approval"},
                        "confirm": _WITHDRAW_CONFIRM,
                    },
                ],
            },
        ],
    }


def _plain(text: str) -> dict[str, Any]:
    """A caller's text in a Teams card, shown as is: a TextRun takes no Markdown (a TextBlock
    would turn ``[Approve](https://…)`` into a link)."""
    return {"type": "RichTextBlock", "inlines": [{"type": "TextRun", "text": text}]}


def _teams(s: dict[str, Any]) -> dict[str, Any]:
    facts = [{"title": k, "value": str(s[k])} for k in ("agent_id", "tool", "rule", "group")]
    more = f"aegis approvals show {s['approval_id']}"
    fields = request_lines(s["query"], s["headers"]) or ["(no query or headers)"]
    params = json_lines(s["parameters"])
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "weight": "Bolder", "text": "Approval needed"},
        {"type": "FactSet", "facts": facts},
        # A FactSet value takes Markdown; the origin user and reasons are shown as plain text.
        _plain("\n".join(f"{name}: {value}" for name, value in _context(s))),
        _plain(f"{s['method']} {_cut(_visible(s['path']), 512)}"),
        _plain(_fit(fields, _TEAMS_TEXT, more)),
        _plain(_fit(params, _TEAMS_TEXT, more)),
        {"type": "TextBlock", "wrap": True,
         "text": f"Reply `approve {s['approval_id']} <why>` or `deny {s['approval_id']} <why>`; "
                 f"to take an unused approval back, `withdraw {s['approval_id']} <why>`"},
    ]  # fmt: skip
    card = {"type": "AdaptiveCard", "version": "1.4", "body": body,
            "actions": [{"type": "Action.OpenUrl", "title": "Status", "url": s["status_url"]}]}  # fmt: skip
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


def message_for(kind: str, req: ApprovalRequest, status_url: str) -> dict[str, Any]:
    """The JSON document posted for ``req`` to a channel of ``kind``."""
    s = _summary(req, status_url)
    if kind == "slack":
        return _slack(s)
    if kind == "teams":
        return _teams(s)
    return {"type": "aegis.approval_requested", "request": s}


Sleep = Callable[[float], Awaitable[None]]


class Notifier:
    """Posts to one configured channel with retries."""

    def __init__(
        self,
        channel: ApprovalChannel,
        secret: bytes,
        *,
        clock: Clock,
        attempts: int,
        backoff: float,
        timeout: float,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.channel, self._secret, self._clock = channel, secret, clock
        self._attempts, self._backoff = attempts, backoff
        self._timeout, self._sleep = timeout, sleep

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.channel.kind == "webhook":
            ts = str(int(self._clock.now()))
            headers["x-aegis-timestamp"] = ts
            headers["x-aegis-signature"] = sign_v0(self._secret, ts, body)
        return headers

    async def send(self, req: ApprovalRequest, status_url: str) -> Delivery:
        kind = self.channel.kind
        body = json.dumps(message_for(kind, req, status_url), separators=(",", ":")).encode()
        error: str | None = None
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(1, self._attempts + 1):
                if attempt > 1:
                    APPROVAL_NOTIFICATIONS.labels(kind=kind, outcome="retried").inc()
                    await self._sleep(self._backoff * 2 ** (attempt - 2))
                try:
                    async with session.post(
                        self.channel.url, data=body, headers=self._headers(body)
                    ) as resp:
                        await resp.read()
                        if 200 <= resp.status < 300:
                            APPROVAL_NOTIFICATIONS.labels(kind=kind, outcome="delivered").inc()
                            return Delivery("delivered", attempt)
                        error = f"http {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = type(exc).__name__
        APPROVAL_NOTIFICATIONS.labels(kind=kind, outcome="failed").inc()
        return Delivery("failed", self._attempts, error)
