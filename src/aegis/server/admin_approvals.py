"""Approvals over the admin API: ``/v1/admin/approvals`` (list, show, approve, deny, withdraw).

Reading needs any key (``Reader``); deciding needs an ``admin`` or ``operator`` key (``Operator``;
auditors never get past the middleware with a POST) that is also listed as an approver's
``admin_keys`` in ``approvals.approvers``: the key is how the approver authenticated, the
configured approver is who decides, and the service checks group membership and separation of
duties. A refused decision is audited and answered with its own code; the request is unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from aegis.approvals.model import State
from aegis.approvals.service import ApprovalService
from aegis.approvals.wiring import approvals_for
from aegis.server.admin_auth import Operator, Reader
from aegis.server.services import Services

__all__ = ["DecisionIn", "router"]

router = APIRouter(prefix="/admin/approvals")


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Why: kept in the audit record and shown to the agent.
    reason: Annotated[str, Field(max_length=1000)] = ""


def _service(request: Request) -> ApprovalService:
    services: Services = request.app.state.services
    return approvals_for(services)


@router.get("")
async def list_approvals(
    key: Reader,
    request: Request,
    state: Annotated[State | None, Query()] = None,
) -> dict[str, Any]:
    items = await _service(request).list_requests(state)
    return {"items": [r.to_dict() for r in items]}


@router.get("/{approval_id}")
async def show_approval(approval_id: str, key: Reader, request: Request) -> dict[str, Any]:
    return (await _service(request).get(approval_id)).to_dict()


@router.post("/{approval_id}/approve")
async def approve(
    approval_id: str, body: DecisionIn, key: Operator, request: Request
) -> dict[str, Any]:
    req = await _service(request).decide(
        approval_id, via="api", credential=key.key_id, approve=True, reason=body.reason
    )
    return req.to_dict()


@router.post("/{approval_id}/deny")
async def deny(
    approval_id: str, body: DecisionIn, key: Operator, request: Request
) -> dict[str, Any]:
    req = await _service(request).decide(
        approval_id, via="api", credential=key.key_id, approve=False, reason=body.reason
    )
    return req.to_dict()


@router.post("/{approval_id}/withdraw")
async def withdraw(
    approval_id: str, body: DecisionIn, key: Operator, request: Request
) -> dict[str, Any]:
    req = await _service(request).withdraw(
        approval_id, via="api", credential=key.key_id, reason=body.reason
    )
    return req.to_dict()
