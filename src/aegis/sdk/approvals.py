"""Waiting for a human: ``approval_needed`` → poll the status URL → retry once with the override.

The gateway answers a call that needs approval with 403 ``{code: approval_needed, approval_id,
status_url}``. The SDK polls ``status_url`` (with the agent's own token and a fresh DPoP proof) with
a doubling delay, only if it is on the control plane (or an origin the agent trusts),, up to :attr:`ApprovalPolicy.timeout`. The status document's ``state`` is ``pending``,
``approved`` (with the one-time ``override_token``), or anything else (``denied``, ``expired``,
``used``): final. With the override the call is sent exactly once more, carrying
:attr:`ApprovalPolicy.header`; the override is bound to that exact request, so it is of no use for
any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

from aegis.sdk.errors import ApprovalDeniedError, ApprovalRequiredError, ApprovalTimeoutError

__all__ = ["OVERRIDE_HEADER", "ApprovalPolicy", "ApprovalWait"]

#: The request header that carries a one-time override token on the retried call.
OVERRIDE_HEADER: Final = "x-aegis-override"
_PENDING: Final = frozenset({"pending", "waiting"})
_TOKEN_FIELDS: Final = ("override_token", "override", "token")


@dataclass(frozen=True, slots=True)
class ApprovalPolicy:
    #: Off: ``approval_needed`` is raised at once as :class:`ApprovalRequiredError`.
    enabled: bool = True
    #: Seconds to wait for a decision before :class:`ApprovalTimeoutError`.
    timeout: float = 120.0
    poll_initial: float = 0.25
    poll_max: float = 5.0
    header: str = OVERRIDE_HEADER
    #: Origins besides the control plane's (``approvals.status_base_url``) whose status URLs may be
    #: polled. Any other ``status_url`` is not followed: a refusal body can come from anyone on
    #: the path, and the poll carries the agent's access token.
    status_origins: tuple[str, ...] = ()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class ApprovalWait:
    """The state of one wait: the next delay, and what a status document means."""

    def __init__(
        self,
        policy: ApprovalPolicy,
        refusal: ApprovalRequiredError,
        now: float,
        *,
        control_plane: str,
    ) -> None:
        self.policy, self.refusal = policy, refusal
        self.deadline = now + policy.timeout
        self._delay = policy.poll_initial
        target = urljoin(control_plane + "/", refusal.status_url or "")
        trusted = {_origin(o) for o in (control_plane, *policy.status_origins)}
        if urlsplit(target).scheme not in ("http", "https") or _origin(target) not in trusted:
            raise self._final(
                ApprovalRequiredError,
                "the status_url is not on the control plane, so it was not polled "
                "(add its origin to ApprovalPolicy.status_origins if it is yours)",
            )
        self.status_url = target

    def next_delay(self, now: float) -> float:
        """Seconds to sleep before the next poll; raises :class:`ApprovalTimeoutError` when the
        deadline has passed."""
        if now >= self.deadline:
            raise self._final(ApprovalTimeoutError, "no decision in time; the call was not sent")
        delay = min(self._delay, self.deadline - now)
        self._delay = min(self._delay * 2, self.policy.poll_max)
        return delay

    def interpret(self, status: int, body: Mapping[str, Any]) -> str | None:
        """The override token once approved; None while pending; raises when final."""
        if status >= 400:
            raise self._final(ApprovalDeniedError, f"the approval status answered {status}")
        state = body.get("state", body.get("status"))
        if state in _PENDING:
            return None
        if state == "approved":
            for name in _TOKEN_FIELDS:
                token = body.get(name)
                if isinstance(token, str) and token:
                    return token
            raise self._final(ApprovalDeniedError, "approved, but no override token was issued")
        raise self._final(ApprovalDeniedError, f"the approval is {state}; the call was not sent")

    def _final(self, cls: type[ApprovalRequiredError], message: str) -> ApprovalRequiredError:
        r = self.refusal
        return cls(
            message, code=r.code, status=r.status, decision_id=r.decision_id, details=r.details
        )
