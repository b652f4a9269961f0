"""The policy dry-run helper against the real admin API: a decision and its trace, nothing stored."""

from __future__ import annotations

import pytest
import yaml

from aegis.sdk import ClientAuthenticationError, InvalidRequestError, policy_dry_run
from tests.sdk.conftest import POLICY, Stack

pytestmark = pytest.mark.slow
CALL = {"tool": "payments.transfer", "scopes": ["payments:write"], "body": {"amount": 100}}


def test_a_document_is_decided_with_its_trace(stack: Stack) -> None:
    document = yaml.safe_load(POLICY)
    small = policy_dry_run(stack.url, stack.admin_key, CALL, policy=document)
    assert small["decision"]["action"] == "allow"
    assert "pay-small" in small["decision"]["rule_ids"]
    large = {**CALL, "body": {"amount": 9000}}
    _, agent = stack.key_agent("dry")
    with agent:
        result = agent.dry_run(stack.admin_key, large, policy=document)
    assert result["decision"]["action"] == "deny"
    assert {rule["id"] for rule in result["trace"]} >= {"pay-small", "pay-large"}


def test_no_policy_named_is_refused_before_sending() -> None:
    with pytest.raises(InvalidRequestError):
        policy_dry_run("http://127.0.0.1:9", "k", CALL)


def test_the_admin_key_is_never_sent_in_clear() -> None:
    """An operator's key: over https, or to this host's loopback, as every SDK credential."""
    with pytest.raises(ValueError, match="https only"):
        policy_dry_run("http://aegis.example.com", "aegis_ak_secret", CALL, tenant="t", env="e")


def test_a_wrong_admin_key_is_a_typed_error(stack: Stack) -> None:
    with pytest.raises(ClientAuthenticationError) as err:
        policy_dry_run(stack.url, "aegis_ak_0000_nope", CALL, policy=yaml.safe_load(POLICY))
    assert err.value.code == "unauthenticated"
    assert err.value.status == 401
