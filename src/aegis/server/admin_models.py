"""Request bodies of the admin API, validated before any route runs.

Unknown fields are refused (``extra="forbid"``): a misspelt ``scope`` must be an error, not an
agent registered without scopes. Sizes are bounded here; ids, scopes, e-mail addresses and keys
are checked by the registry, the one place that knows their rules.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from aegis.types import AdminRole, ClientAuthMethod

__all__ = [
    "AdminKeyIn",
    "AgentIn",
    "AgentPatch",
    "ClientIn",
    "ReasonIn",
    "RotateIn",
    "TokenIn",
]

_Short = Annotated[str, Field(min_length=1, max_length=200)]
_Items = Annotated[list[_Short], Field(max_length=100)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentIn(_Body):
    id: _Short
    tenant: _Short
    env: _Short
    #: The accountable human's e-mail address.
    owner: _Short
    display_name: str = Field(default="", max_length=200)
    roles: _Items = []
    scopes: _Items = []
    software_version: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    attributes: dict[str, Any] = {}
    jwks: list[dict[str, Any]] = Field(default=[], max_length=10)


class AgentPatch(_Body):
    display_name: str | None = Field(default=None, max_length=200)
    owner: str | None = Field(default=None, max_length=200)
    roles: _Items | None = None
    scopes: _Items | None = None
    software_version: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=200)
    attributes: dict[str, Any] | None = None
    jwks: list[dict[str, Any]] | None = Field(default=None, max_length=10)


class ReasonIn(_Body):
    reason: str = Field(min_length=1, max_length=500)


class ClientIn(_Body):
    agent_id: _Short
    auth_method: ClientAuthMethod = ClientAuthMethod.CLIENT_SECRET_BASIC
    dpop_bound: bool = False
    tls_san_uri: str | None = Field(default=None, max_length=500)


class RotateIn(_Body):
    force: bool = False


class SecretRotateIn(_Body):
    #: The previous secret stops now (a leak), not after ``secrets.rotation_overlap``.
    revoke_previous: bool = False


class TokenIn(_Body):
    agent_id: _Short
    client_id: str | None = Field(default=None, max_length=200)
    scopes: _Items = []
    audience: _Items = []
    lifetime: int | None = Field(default=None, gt=0)


class AdminKeyIn(_Body):
    name: _Short
    role: AdminRole
