"""The demo's tools: a payment service and a CRM, plain HTTP servers behind the gateway.

They trust the gateway completely, as a tool behind Aegis does: they read who called from the
``x-aegis-agent-id`` header the gateway sets and do what they are asked. The CRM answers with a
customer's e-mail address and card number, which policy has the gateway mask on the way out.
"""

from __future__ import annotations

import itertools
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["CUSTOMER", "crm_app", "payments_app"]

#: What the CRM knows about customer 42 (fictitious; the card number is a well-known test number).
CUSTOMER: dict[str, Any] = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada.lovelace@example.com",
    "card": "4111 1111 1111 1111",
    "tier": "gold",
}


def payments_app() -> Starlette:
    ids = itertools.count(1001)

    async def transfer(request: Request) -> Response:
        body = await request.json()
        return JSONResponse(
            {
                "status": "paid",
                "payment_id": f"pay_{next(ids)}",
                "amount": body.get("amount"),
                "account": body.get("account"),
                "by": request.headers.get("x-aegis-agent-id"),
            }
        )

    return Starlette(routes=[Route("/payments/transfer", transfer, methods=["POST"])])


def crm_app() -> Starlette:
    async def customer(request: Request) -> Response:
        return JSONResponse({**CUSTOMER, "id": int(request.path_params["cid"])})

    return Starlette(routes=[Route("/crm/customers/{cid:int}", customer, methods=["GET"])])
