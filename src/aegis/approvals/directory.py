"""Who may decide: the configured approvers, found by how they authenticated.

An approver is authenticated by the channel, never by what a request claims: an admin API key id
(the admin API authenticated the key), a Slack user id (from a callback whose signature verified),
a Teams user (likewise), or a name given to the CLI (whoever can open the database acts with full
rights, as for every CLI command). The directory only maps those to a configured
:class:`~aegis.config.Approver`; group membership and separation of duties are checked by the
service, per request.
"""

from __future__ import annotations

from typing import Literal

from aegis.config import ApprovalSettings, Approver

__all__ = ["ApproverDirectory", "Via"]

#: How a decision arrived (audited as ``channel``).
Via = Literal["api", "cli", "slack", "teams"]


class ApproverDirectory:
    def __init__(self, settings: ApprovalSettings) -> None:
        self._by_id = {a.id.lower(): a for a in settings.approvers}
        self._by_key = {k: a for a in settings.approvers for k in a.admin_keys}
        self._by_slack = {a.slack_user: a for a in settings.approvers if a.slack_user}
        self._by_teams = {a.teams_user: a for a in settings.approvers if a.teams_user}

    def find(self, via: Via, credential: str) -> Approver | None:
        """The approver behind ``credential`` as authenticated by ``via``, or None."""
        if via == "api":
            return self._by_key.get(credential)
        if via == "slack":
            return self._by_slack.get(credential)
        if via == "teams":
            return self._by_teams.get(credential)
        return self._by_id.get(credential.lower())

    def __len__(self) -> int:
        return len(self._by_id)
