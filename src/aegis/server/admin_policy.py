"""Policy dry runs over the admin API: ``POST /v1/policy/dry-run`` (operator or admin).

Versions, activations and OPA bundles are in :mod:`aegis.server.admin_policy_versions`.

The body names the policy in exactly one way: a ``policy`` document (the YAML/JSON form, as an
object), a stored ``version``, or ``tenant`` and ``env`` for the version active there. The
``input`` is one call in its JSON form (see docs/policy.md). The answer is
:func:`aegis.policy.dry_run`'s: the decision the gateway would take and a trace of every rule.
Nothing is stored, counted or emitted; a policy that cannot be found is an error, never an allow.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from aegis.errors import InvalidRequest, NotFound
from aegis.policy import PolicyStore, SqlPolicyStore, dry_run, load_document
from aegis.server.admin_auth import Operator
from aegis.server.admin_policy_versions import router as versions_router
from aegis.server.services import Services

__all__ = ["DryRunIn", "router"]

router = APIRouter()
# Stored versions, activations and the OPA bundle live beside the dry run, under /v1/policy.
router.include_router(versions_router)

_Short = Annotated[str, Field(min_length=1, max_length=200)]


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: A policy document to evaluate instead of a stored one (never stored by a dry run).
    policy: dict[str, Any] | None = None
    #: A stored policy version to evaluate.
    version: _Short | None = None
    #: With ``env``: evaluate the version active for this tenant and environment.
    tenant: _Short | None = None
    env: _Short | None = None
    #: The call to decide, in its JSON form.
    input: dict[str, Any]


def _run(body: DryRunIn, store: PolicyStore) -> dict[str, Any]:
    policy, version, tenant, env = body.policy, body.version, body.tenant, body.env
    scope = (tenant, env) if tenant is not None and env is not None else None
    given = [policy is not None, version is not None, tenant is not None or env is not None]
    if sum(given) != 1 or (given[2] and scope is None):
        raise InvalidRequest(
            "name the policy one way: 'policy' (a document), 'version', or 'tenant' and 'env'",
            field="policy",
        )
    if policy is not None:
        doc = load_document(json.dumps(policy), file="<request policy>")
        return dry_run(doc, body.input)
    if version is None and scope is not None:
        active = store.active(*scope)
        if active is None:
            raise NotFound(
                f"no policy is active for tenant {scope[0]!r} env {scope[1]!r}; "
                "activate one with 'aegis policy' or pass 'policy' or 'version'"
            )
        version = active.version
    if version is None:  # unreachable after the check above; refuse rather than assume
        raise InvalidRequest("name a policy to dry-run", field="policy")
    return dry_run(version, body.input, store=store)


@router.post("/policy/dry-run")
def policy_dry_run(body: DryRunIn, key: Operator, request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    # The control plane holds no policy store of its own: open the configured database for this
    # request (dry runs are rare operator actions) and always close it again.
    store: SqlPolicyStore = SqlPolicyStore(services.config.database_url())
    try:
        return _run(body, store)
    finally:
        store.close()
