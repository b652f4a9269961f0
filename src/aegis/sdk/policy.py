"""Policy dry runs from code: what the gateway would decide for one call, without making it.

``POST {control plane}/v1/policy/dry-run`` (operator or admin key) evaluates the call against a
policy document, a stored version, or the version active for a tenant and environment, and answers
the decision with a trace of every rule. Nothing is stored, counted or sent anywhere.
"""

from __future__ import annotations

from typing import Any

import httpx

from aegis.sdk.auth import refuse_cleartext
from aegis.sdk.errors import InvalidRequestError
from aegis.sdk.wire import error_from_response

__all__ = ["policy_dry_run"]


def policy_dry_run(
    base_url: str,
    admin_key: str,
    call: dict[str, Any],
    *,
    policy: dict[str, Any] | None = None,
    version: str | None = None,
    tenant: str | None = None,
    env: str | None = None,
    http: httpx.Client | None = None,
) -> dict[str, Any]:
    """The ``{decision, trace}`` for ``call`` (its JSON form, docs/policy.md). Name the policy
    one way: ``policy`` (a document as a dict), ``version``, or ``tenant`` and ``env``."""
    body: dict[str, Any] = {"input": call}
    for name, value in (("policy", policy), ("version", version), ("tenant", tenant), ("env", env)):
        if value is not None:
            body[name] = value
    if len(body) == 1:
        raise InvalidRequestError(
            "name the policy: policy=, version=, or tenant= and env=", code="invalid_request"
        )
    url = f"{base_url.rstrip('/')}/v1/policy/dry-run"
    refuse_cleartext(url)  # an operator's key: never in clear beyond loopback
    headers = {"Authorization": f"Bearer {admin_key}"}
    if http is None:
        response = httpx.post(url, json=body, headers=headers, timeout=10.0)
    else:
        response = http.post(url, json=body, headers=headers)
    if response.status_code != 200:
        raise error_from_response(response)
    result: dict[str, Any] = response.json()
    return result
