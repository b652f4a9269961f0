"""What reaches the upstream: the proxy's header hygiene and the fields a proxy in front of an
ext_authz door is asked to remove."""

from __future__ import annotations

import pytest

from aegis.gateway.evidence import Result
from aegis.gateway.ext_authz import removed_upstream
from aegis.gateway.hygiene import REQUEST_DROP, forwardable


@pytest.mark.parametrize(
    "name", ["proxy", "Proxy", "proxy_target", "proxy-authorization", "X_Aegis_Agent_Id"]
)
def test_proxy_and_identity_fields_are_never_forwarded(name: str) -> None:
    """A CGI upstream reads ``Proxy`` as ``HTTP_PROXY`` ("httpoxy"), and ``X_Aegis_Agent_Id`` as
    the identity field the gateway sets."""
    assert forwardable([(name, "x"), ("x-mode", "fast")], REQUEST_DROP) == [("x-mode", "fast")]


def _allowed(approved: bool) -> Result:
    return Result("d", "allow", 200, None, "allowed", approved=approved,
                  upstream_headers={"x-aegis-agent-id": "a"})  # fmt: skip


def test_an_approved_call_has_every_field_it_is_not_bound_to_removed() -> None:
    """Behind Envoy the caller's fields reach the upstream unless named for removal: on a call
    passing with an override, so is every field the approval is not bound to."""
    names = ["authorization", "x-envoy-retry-on", "baggage", "traceparent", "x-destination",
             "content-type", "host", "content-length", "x-forwarded-for", "x-aegis-agent-id",
             "proxy"]  # fmt: skip
    assert removed_upstream(names, _allowed(approved=False)) == ["authorization", "proxy"]
    assert removed_upstream(names, _allowed(approved=True)) == [
        "authorization", "baggage", "proxy", "traceparent", "x-envoy-retry-on"]  # fmt: skip
