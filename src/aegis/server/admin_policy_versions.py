"""Policy versions over the admin API: store, activate, read, and serve the active OPA bundle.

* ``POST /v1/policy/versions`` (operator): validate and store a document; returns its
  content-addressed version. A rejected document is ``policy_invalid`` and changes nothing.
* ``POST /v1/policy/activations`` (operator): make a stored version active for (tenant, env).
  Gateways pick it up on their next poll (``PolicyWatcher``); nothing restarts.
* ``GET /v1/policy/versions``, ``GET /v1/policy/active?tenant=&env=`` (any role): what is stored,
  what is active and the activation history.
* ``GET /v1/policy/bundles/{tenant}/{env}`` (any role): the active version as an OPA bundle
  (``bundle.tar.gz``), with ``ETag`` = the version so OPA's bundle polling gets ``304`` until a new
  activation. OPA authenticates with an admin API key (``credentials.bearer``); like every admin
  path there is no anonymous access. No active version is ``not_found``, never an empty bundle.

Every stored, rejected and activated document is a lifecycle event in the registry's event log
(``/v1/admin/events``), with the admin key as actor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from aegis.errors import NotFound
from aegis.policy import PolicyService, SqlPolicyStore, build_bundle, compile_policy
from aegis.policy.service import registry_event_hook
from aegis.policy.store import Activation
from aegis.server.admin_auth import Operator, Reader, actor
from aegis.server.services import Services

__all__ = ["ActivationIn", "VersionIn", "router"]

router = APIRouter()

_Id = Annotated[str, Field(min_length=1, max_length=200)]
_BUNDLE_TYPE = "application/gzip"


class VersionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The policy document (its YAML/JSON form, as an object).
    policy: dict[str, Any]


class ActivationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: _Id
    env: _Id
    #: A stored version (``POST /v1/policy/versions`` returned it).
    version: _Id


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


@contextmanager
def _policy(request: Request) -> Iterator[tuple[PolicyService, SqlPolicyStore]]:
    """A policy service on the configured database whose events go to the registry event log."""
    services = _services(request)
    store = SqlPolicyStore(services.config.database_url())
    emit = registry_event_hook(services.registry_store)
    try:
        yield PolicyService(store, clock=services.clock, emit=emit), store
    finally:
        store.close()


def _activation(a: Activation) -> dict[str, Any]:
    return {
        "tenant": a.tenant,
        "env": a.env,
        "version": a.version,
        "activated_at": a.activated_at,
        "actor": a.actor,
    }


@router.post("/policy/versions", status_code=201)
def store_version(body: VersionIn, key: Operator, request: Request) -> dict[str, Any]:
    with _policy(request) as (service, store):
        version = service.store(json.dumps(body.policy), file="<request policy>", actor=actor(key))
        return {"version": version, "name": store.get(version).metadata.name}


@router.get("/policy/versions")
def list_versions(key: Reader, request: Request) -> dict[str, Any]:
    with _policy(request) as (_, store):
        items = [
            {"version": v.version, "name": v.name, "created_at": v.created_at}
            for v in store.versions()
        ]
    return {"items": items}


@router.post("/policy/activations", status_code=201)
def activate(body: ActivationIn, key: Operator, request: Request) -> dict[str, Any]:
    with _policy(request) as (service, _):
        done = service.activate(body.tenant, body.env, body.version, actor=actor(key))
    return _activation(done)


@router.get("/policy/active")
def active(
    key: Reader, request: Request, tenant: Annotated[str, Query()], env: Annotated[str, Query()]
) -> dict[str, Any]:
    with _policy(request) as (_, store):
        current = store.active(tenant, env)
        if current is None:
            raise NotFound(f"no policy is active for tenant {tenant!r} env {env!r}")
        history = [_activation(a) for a in store.history(tenant, env)]
    return {**_activation(current), "history": history}


@router.get("/policy/bundles/{tenant}/{env}", response_class=Response)
def bundle(tenant: str, env: str, key: Reader, request: Request) -> Response:
    with _policy(request) as (_, store):
        current = store.active(tenant, env)
        if current is None:
            raise NotFound(f"no policy is active for tenant {tenant!r} env {env!r}")
        etag = f'"{current.version}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = build_bundle(compile_policy(store.get(current.version)))
    return Response(data, media_type=_BUNDLE_TYPE, headers=headers)
