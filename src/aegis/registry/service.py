"""The agent registry: tenants, environments, agents, OAuth clients and their life cycles.

Every operation validates all of its input before writing, writes its records and its lifecycle
event in one transaction (a failed operation writes nothing), and returns the new record.

Leaving ``active`` (suspend, quarantine, retire) sets the agent's ``tokens_not_before`` to now: every
token issued before that instant is dead at once, everywhere, without storing each token. Retired is
final. Quarantine means "under investigation": only an admin may release it.

Suspending a tenant and disabling a client end earlier tokens the same way, through the same durable
mark on the agents concerned, so that reactivating the tenant or re-enabling the client never brings
back a token issued before (for example one minted with a leaked secret that has since been
rotated). The registry keeps no such mark per client, so disabling a client ends every earlier token
of its agent, those of the agent's other clients included: ending too many tokens only makes their
holders ask for new ones, keeping one alive would not be noticed.

Returning to ``active`` (an agent reactivated or released, a tenant reactivated, a client enabled
again) moves the mark once more, to the instant of the return: a token service whose registry
cache had not yet seen the suspension, or whose clock runs ahead, may have issued tokens with an
``iat`` past the suspension's mark, refused while the agent was inactive; without this they would
come back with the reactivation. A token service authenticates a client, and reads its agent,
from the store, never a cached copy (``ClientAuthenticator``): a secret stopped or a key removed a
moment ago authenticates nothing anywhere. Token ``iat`` values are whole seconds and never ahead
of the clock: while a mark lies ahead of the current second, nothing is issued
(``refuse_unsettled``), so every mark reaches every token issued before it.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

from aegis.clock import Clock, new_id
from aegis.crypto.keys import jwk_thumbprint, public_key_from_jwk
from aegis.errors import AccessDenied, ClientAuthError, Conflict, InvalidRequest, NotFound
from aegis.registry.secrets import hash_secret, new_secret, secret_matches
from aegis.stores.base import RegistryStore
from aegis.types import (
    AdminKey,
    AdminRole,
    Agent,
    AgentStatus,
    Client,
    ClientAuthMethod,
    ClientSecret,
    Environment,
    Event,
    Tenant,
    TenantStatus,
)

__all__ = [
    "ID_PATTERN",
    "SCOPE_PATTERN",
    "AgentSpec",
    "RegistryService",
    "check_id",
]

#: Tenant, environment and agent ids: lowercase, digits, ``-`` and ``.``; they appear in SPIFFE IDs.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
#: RFC 6749 §3.3 scope-token characters, bounded in length.
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_OWNER_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
#: How deep an agent's attributes may nest (policy reads them by path; a deeper value is no
#: attribute anyone writes a rule on, and its answer could not be serialised).
_MAX_ATTRIBUTE_DEPTH = 16
_SECRET_METHODS = (ClientAuthMethod.CLIENT_SECRET_BASIC, ClientAuthMethod.CLIENT_SECRET_POST)

_TRANSITIONS: dict[AgentStatus, frozenset[AgentStatus]] = {
    AgentStatus.ACTIVE: frozenset(
        {AgentStatus.SUSPENDED, AgentStatus.QUARANTINED, AgentStatus.RETIRED}
    ),
    AgentStatus.SUSPENDED: frozenset(
        {AgentStatus.ACTIVE, AgentStatus.QUARANTINED, AgentStatus.RETIRED}
    ),
    AgentStatus.QUARANTINED: frozenset({AgentStatus.ACTIVE, AgentStatus.RETIRED}),
    AgentStatus.RETIRED: frozenset(),
}


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid tenant, environment or agent id, else ``InvalidRequest``."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidRequest(
            f"{what} {value!r} is not valid: use 1-63 lowercase letters, digits, '-' or '.'",
            field=what,
        )
    return value


def _check_scopes(scopes: tuple[str, ...]) -> tuple[str, ...]:
    for s in scopes:
        if not SCOPE_PATTERN.fullmatch(s):
            raise InvalidRequest(f"scope {s!r} is not a valid RFC 6749 scope token", field="scopes")
    return tuple(dict.fromkeys(scopes))


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Everything needed to register an agent."""

    id: str
    tenant_id: str
    env: str
    #: The accountable human, an e-mail address. Required.
    owner: str
    display_name: str = ""
    roles: tuple[str, ...] = ()
    allowed_scopes: tuple[str, ...] = ()
    software_version: str | None = None
    model: str | None = None
    attributes: dict[str, Any] | None = None
    jwks: tuple[dict[str, Any], ...] = ()


def _changes(before: Agent, after: Agent, fields: Any) -> dict[str, Any]:
    """What an update changed, for its event: scopes, roles and owner before and after, keys by
    thumbprint (the other fields are descriptions)."""
    out: dict[str, Any] = {}
    for name in ("allowed_scopes", "roles", "owner"):
        if name in fields and getattr(before, name) != getattr(after, name):
            old, new = getattr(before, name), getattr(after, name)
            out[name] = {"from": list(old) if isinstance(old, tuple) else old,
                         "to": list(new) if isinstance(new, tuple) else new}  # fmt: skip
    if "jwks" in fields:
        old_keys = [jwk_thumbprint(j) for j in before.jwks]
        new_keys = [jwk_thumbprint(j) for j in after.jwks]
        if old_keys != new_keys:
            out["jwks"] = {"from": old_keys, "to": new_keys}
    return out


def _reopening(now: float) -> float:
    """The ``tokens_not_before`` mark of a return to active: the instant of the return (see
    the module docstring; tokens issued after it carry an ``iat`` rounded up to it)."""
    return now


class RegistryService:
    def __init__(
        self,
        store: RegistryStore,
        *,
        clock: Clock,
        pepper: bytes,
        secret_overlap: float = 86400.0,
    ) -> None:
        self.store = store
        self._clock = clock
        self._pepper = pepper
        self._overlap = secret_overlap
        #: Called with the new record after every committed agent status change (the internal CA
        #: revokes the agent's certificates here). A listener's error reaches the caller.
        self.status_listeners: list[Callable[[Agent], None]] = []
        #: Called likewise after every committed tenant status change (the internal CA revokes
        #: the certificates of every agent of a tenant that leaves ``active``).
        self.tenant_listeners: list[Callable[[Tenant], None]] = []
        #: Called likewise after every committed enable or disable of a client (the internal CA
        #: revokes the certificates enrolled with a disabled client's credentials).
        self.client_listeners: list[Callable[[Client], None]] = []
        #: Called with the records before and after every ``update_agent``, once before it
        #: commits (a failure aborts it) and once after (the internal CA revokes the
        #: certificates a withdrawn serving role or a removed key ended). Judge by the records.
        self.update_listeners: list[Callable[[Agent, Agent], None]] = []

    def _event(
        self, type_: str, actor: str, subject: str, tenant: str | None, **data: Any
    ) -> Event:
        event = Event(new_id(), self._clock.now(), type_, actor, subject, tenant, data)
        self.store.append_event(event)
        return event

    def record(
        self, type_: str, actor: str, subject: str, tenant: str | None, **data: Any
    ) -> Event:
        """Append an event of a change made outside the registry (a token revoked, minted)."""
        return self._event(type_, actor, subject, tenant, **data)

    # -- tenants and environments ----------------------------------------------------------

    def ensure_tenant_env(self, tenant_id: str, env: str, *, actor: str) -> None:
        """Create the tenant and environment if they do not exist yet (inside a transaction)."""
        check_id(tenant_id, "tenant")
        check_id(env, "env")
        now = self._clock.now()
        try:
            tenant = self.store.get_tenant(tenant_id)
        except NotFound:
            tenant = Tenant(tenant_id, tenant_id, TenantStatus.ACTIVE, now)
            self.store.create_tenant(tenant)
            self._event("tenant.created", actor, f"tenant:{tenant_id}", tenant_id)
        if tenant.status is not TenantStatus.ACTIVE:
            raise Conflict(f"tenant {tenant_id} is {tenant.status}; reactivate it first")
        if not any(e.name == env for e in self.store.list_environments(tenant_id)):
            self.store.create_environment(Environment(tenant_id, env, now))
            self._event("environment.created", actor, f"env:{tenant_id}/{env}", tenant_id)

    def set_tenant_status(self, tenant_id: str, status: TenantStatus, *, actor: str) -> Tenant:
        """Set a tenant's status; leaving ``active`` ends every token its agents hold now."""
        with self.store.atomic():
            before = self.store.get_tenant(tenant_id)
            tenant = replace(before, status=status)
            self.store.update_tenant(tenant)
            reopened = status is TenantStatus.ACTIVE and before.status is not TenantStatus.ACTIVE
            for agent in self.store.list_agents(tenant_id=tenant_id):
                if status is not TenantStatus.ACTIVE:
                    self._end_earlier_tokens(agent)
                elif reopened:  # what was issued while it was suspended stays dead (module doc)
                    self._end_tokens_before(agent, _reopening(self._clock.now()))
            self._event(f"tenant.{status.value}", actor, f"tenant:{tenant_id}", tenant_id)
        for listener in self.tenant_listeners:
            listener(tenant)
        return tenant

    def _end_tokens_before(self, agent: Agent, mark: float) -> Agent:
        """Move the agent's ``tokens_not_before`` to ``mark``, never back. Call inside
        ``store.atomic()``."""
        if mark <= agent.tokens_not_before:
            return agent
        agent = replace(agent, tokens_not_before=mark)
        self.store.update_agent(agent)
        return agent

    def _end_earlier_tokens(self, agent: Agent) -> Agent:
        """Move the agent's ``tokens_not_before`` to now (never back): every token issued to it
        before this instant is refused with ``token_revoked`` from now on, whatever state the
        agent, its clients or its tenant are in later. Call inside ``store.atomic()``."""
        return self._end_tokens_before(agent, self._clock.now())

    # -- agents ----------------------------------------------------------------------------

    def register_agent(self, spec: AgentSpec, *, actor: str) -> Agent:
        check_id(spec.id, "agent")
        _check_owner(spec.owner)
        _check_text(
            display_name=spec.display_name, software_version=spec.software_version,
            model=spec.model, roles=spec.roles,
        )  # fmt: skip
        scopes = _check_scopes(tuple(spec.allowed_scopes))
        jwks = tuple(self._check_jwk(j) for j in spec.jwks)
        now = self._clock.now()
        agent = Agent(
            id=spec.id,
            tenant_id=spec.tenant_id,
            env=spec.env,
            display_name=spec.display_name or spec.id,
            owner=spec.owner,
            status=AgentStatus.ACTIVE,
            created_at=now,
            updated_at=now,
            roles=tuple(dict.fromkeys(spec.roles)),
            allowed_scopes=scopes,
            software_version=spec.software_version,
            model=spec.model,
            attributes=_check_attributes(spec.attributes or {}),
            jwks=jwks,
        )
        with self.store.atomic():
            self.ensure_tenant_env(spec.tenant_id, spec.env, actor=actor)
            self.store.create_agent(agent)
            self._event(
                "agent.registered", actor, f"agent:{agent.id}", agent.tenant_id, owner=agent.owner
            )
        return agent

    def _check_jwk(self, jwk: dict[str, Any]) -> dict[str, Any]:
        key = public_key_from_jwk(jwk)  # refuses private members and unknown key types
        kid = jwk.get("kid", key.kid)
        if not isinstance(kid, str) or not 0 < len(kid) <= 200:
            raise InvalidRequest(
                "a key's kid must be a string of 1 to 200 characters", field="jwks"
            )
        return {**key.to_jwk(), "kid": kid}

    def set_agent_status(
        self, agent_id: str, status: AgentStatus, *, actor: str, reason: str = ""
    ) -> Agent:
        with self.store.atomic():
            agent = self.store.get_agent(agent_id)
            if status is agent.status and status is not AgentStatus.ACTIVE:
                # Asked again: what follows the change (the listeners revoke the agent's
                # certificates) runs again, since it may have failed after the status
                # committed, and there would otherwise be no way to retry it.
                self._event(f"agent.{status.value}", actor, f"agent:{agent_id}", agent.tenant_id,
                            reason=reason, reapplied=True)  # fmt: skip
            elif status not in _TRANSITIONS[agent.status]:
                raise Conflict(
                    f"agent {agent_id} is {agent.status.value}; cannot become {status.value}"
                )
            else:
                agent = self._change_status(agent, status, actor=actor, reason=reason)
        for listener in self.status_listeners:
            listener(agent)
        return agent

    def _change_status(
        self, agent: Agent, status: AgentStatus, *, actor: str, reason: str
    ) -> Agent:
        """Inside ``store.atomic()``: the agent in ``status``, recorded."""
        now = self._clock.now()
        changes: dict[str, Any] = {"status": status, "updated_at": now}
        # Kill every live token of this agent at once (iat < now); on the way back to
        # active, what was issued while it was inactive (module docstring). Never backwards:
        # a replica whose clock lags would otherwise revive what an earlier mark ended.
        mark = now if status is not AgentStatus.ACTIVE else _reopening(now)
        changes["tokens_not_before"] = max(agent.tokens_not_before, mark)
        agent = replace(agent, **changes)
        self.store.update_agent(agent)
        self._event(
            f"agent.{status.value}", actor, f"agent:{agent.id}", agent.tenant_id, reason=reason
        )
        return agent

    def update_agent(
        self, agent_id: str, *, actor: str, may_change_quarantined: bool = True, **fields: Any
    ) -> Agent:
        """Change an agent's description. A token carrying a scope no longer allowed is refused
        from now on (the subject check); removing a key from ``jwks`` (one that signs client
        assertions or delegation grants) ends every earlier token of the agent, as a suspension
        does: which key a token was obtained with is not recorded. A quarantined agent changes
        only with ``may_change_quarantined`` (admins): a release must not bring back keys or
        scopes set while it was under investigation. The event records what changed: for
        scopes, roles and owner the values before and after, for keys their thumbprints."""
        allowed = {
            "display_name",
            "roles",
            "allowed_scopes",
            "software_version",
            "model",
            "attributes",
            "jwks",
            "owner",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidRequest(f"cannot update {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "allowed_scopes" in fields:
            fields["allowed_scopes"] = _check_scopes(tuple(fields["allowed_scopes"]))
        if "jwks" in fields:
            fields["jwks"] = tuple(self._check_jwk(j) for j in fields["jwks"])
        _check_text(**{k: fields[k] for k in _TEXT_FIELDS if k in fields})
        if "roles" in fields:
            fields["roles"] = tuple(fields["roles"])
        if "attributes" in fields:
            fields["attributes"] = _check_attributes(fields["attributes"])
        if "owner" in fields:
            _check_owner(fields["owner"])
        # What the change ends (certificates) is ended before it commits as well as after: if
        # that fails, the change is not made, and its retry ends it again. (Run after the
        # commit only, a failure left the change made and its retry, changing nothing, ending
        # nothing.) A change that then fails has ended too much, never too little.
        planned = self.store.get_agent(agent_id)
        self._refuse_change(planned, may_change_quarantined)
        self.store.check_agent(replace(planned, **fields))  # a refused change ends nothing
        for listener in self.update_listeners:
            listener(planned, replace(planned, **fields))
        with self.store.atomic():
            before = self.store.get_agent(agent_id)
            self._refuse_change(before, may_change_quarantined)
            agent = replace(before, updated_at=self._clock.now(), **fields)
            self.store.update_agent(agent)
            kept = {jwk_thumbprint(j) for j in agent.jwks}
            if any(jwk_thumbprint(j) not in kept for j in before.jwks):
                agent = self._end_earlier_tokens(agent)
            self._event(
                "agent.updated", actor, f"agent:{agent_id}", agent.tenant_id,
                fields=sorted(fields), changes=_changes(before, agent, fields),
            )  # fmt: skip
        for listener in self.update_listeners:
            listener(before, agent)
        return agent

    @staticmethod
    def _refuse_change(agent: Agent, may_change_quarantined: bool) -> None:
        if agent.status is AgentStatus.RETIRED:
            raise Conflict(f"agent {agent.id} is retired and cannot change")
        if agent.status is AgentStatus.QUARANTINED and not may_change_quarantined:
            raise AccessDenied(
                f"agent {agent.id} is quarantined; only an admin key may change it",
                code="forbidden",
            )

    # -- clients ---------------------------------------------------------------------------

    def create_client(
        self,
        agent_id: str,
        *,
        auth_method: ClientAuthMethod = ClientAuthMethod.CLIENT_SECRET_BASIC,
        dpop_bound: bool = False,
        tls_san_uri: str | None = None,
        actor: str,
    ) -> tuple[Client, str | None]:
        """Create a client for an agent. Returns the client and, for secret methods, the secret
        in clear: shown once, never stored."""
        now = self._clock.now()
        secret = new_secret("aegis_cs_") if auth_method in _SECRET_METHODS else None
        with self.store.atomic():
            agent = self.store.get_agent(agent_id)
            if agent.status is not AgentStatus.ACTIVE:
                raise Conflict(
                    f"agent {agent_id} is {agent.status.value}; clients need an active agent"
                )
            if auth_method is ClientAuthMethod.PRIVATE_KEY_JWT and not agent.jwks:
                raise InvalidRequest(
                    "private_key_jwt needs a registered public key: add --jwk to the agent"
                )
            client = Client(
                client_id=f"{agent_id}.{new_id(6)}",
                agent_id=agent_id,
                auth_method=auth_method,
                created_at=now,
                secrets=(ClientSecret(hash_secret(self._pepper, secret), now),) if secret else (),
                dpop_bound=dpop_bound,
                tls_san_uri=tls_san_uri,
            )
            self.store.create_client(client)
            self._event(
                "client.created",
                actor,
                f"client:{client.client_id}",
                agent.tenant_id,
                agent=agent_id,
                method=auth_method.value,
            )
        return client, secret

    def rotate_secret(
        self,
        client_id: str,
        *,
        actor: str,
        may_change_quarantined: bool = True,
        revoke_previous: bool = False,
    ) -> tuple[Client, str]:
        """A new secret; the previous one keeps working for the overlap window, older ones stop now.
        With ``revoke_previous``, or for a disabled client (disabling is the answer to a leaked
        secret, and nothing uses a disabled client's secret meanwhile), every earlier secret stops
        now: a leaked one must not come back for the overlap when the client is enabled again.
        A quarantined agent's client gets one only with ``may_change_quarantined`` (admins)."""
        now = self._clock.now()
        secret = new_secret("aegis_cs_")
        with self.store.atomic():
            client = self.store.get_client(client_id)
            self._refuse_retired(client)
            self._refuse_quarantined(client, may_change_quarantined)
            if client.auth_method not in _SECRET_METHODS:
                raise Conflict(
                    f"client {client_id} authenticates with {client.auth_method.value}, not a secret"
                )
            # At most two secrets live: the new one and the one it replaces (for the overlap).
            # A secret already rotated away stops working now.
            overlap = not revoke_previous and client.active
            kept = [
                replace(s, expires_at=now + self._overlap)
                for s in client.secrets
                if s.expires_at is None and overlap
            ]
            kept.append(ClientSecret(hash_secret(self._pepper, secret), now))
            client = replace(client, secrets=tuple(kept))
            self.store.update_client(client)
            agent = self.store.get_agent(client.agent_id)
            self._event("client.secret_rotated", actor, f"client:{client_id}", agent.tenant_id,
                        previous_revoked=not overlap)  # fmt: skip
        return client, secret

    def set_client_active(
        self, client_id: str, active: bool, *, actor: str, may_change_quarantined: bool = True
    ) -> Client:
        """Enable or disable a client; disabling ends every token this client holds now, for
        good (its ``tokens_not_before`` moves to now and never back), every secret rotated away
        and still in its overlap, and (``client_listeners``) every certificate enrolled with its
        credentials: enabling it again does not revive them.
        The agent's other clients keep theirs. A quarantined agent's client is enabled only with
        ``may_change_quarantined`` (admins); any key may disable one."""
        with self.store.atomic():
            before = self.store.get_client(client_id)
            if active:
                self._refuse_retired(before)
                self._refuse_quarantined(before, may_change_quarantined)
            client = replace(before, active=active)
            now = self._clock.now()
            if not active or not before.active:  # enabling an enabled client changes nothing
                mark = now if not active else _reopening(now)  # see the module docstring
                client = replace(client, tokens_not_before=max(client.tokens_not_before, mark))
            if not active:
                # Disabling answers a leak: a secret rotated away and still in its overlap stops
                # now, or it would work again when the client is enabled.
                current = tuple(s for s in client.secrets if s.expires_at is None)
                client = replace(client, secrets=current or client.secrets)
            self.store.update_client(client)
            agent = self.store.get_agent(client.agent_id)
            self._event(
                "client.enabled" if active else "client.disabled",
                actor,
                f"client:{client_id}",
                agent.tenant_id,
            )
        # Run for a repeated disable too: what follows it may have failed after it committed.
        for listener in self.client_listeners:
            listener(client)
        return client

    def _refuse_quarantined(self, client: Client, may_change_quarantined: bool) -> None:
        """Under investigation, an agent's credentials change only by an admin's hand: a
        release must not bring back a client disabled, or a secret handed out, meanwhile."""
        if may_change_quarantined:
            return
        if self.store.get_agent(client.agent_id).status is AgentStatus.QUARANTINED:
            raise AccessDenied(
                f"client {client.client_id} belongs to a quarantined agent; only an admin key "
                "may enable it or give it a new secret",
                code="forbidden",
            )

    def _refuse_retired(self, client: Client) -> None:
        """Retired is final: a retired agent's client gets no fresh secret and is not enabled."""
        if self.store.get_agent(client.agent_id).status is AgentStatus.RETIRED:
            raise Conflict(
                f"client {client.client_id} belongs to a retired agent and cannot change"
            )

    def check_secret(self, client: Client, presented: str) -> None:
        """Raise ``ClientAuthError`` unless ``presented`` matches a current secret. Every stored
        secret is compared, so timing does not reveal which one matched."""
        now = self._clock.now()
        ok = False
        for s in client.secrets:
            if secret_matches(self._pepper, presented, s.hash) and (
                s.expires_at is None or now < s.expires_at
            ):
                ok = True
        if not ok:
            raise ClientAuthError("client authentication failed")

    # -- admin API keys --------------------------------------------------------------------

    def create_admin_key(self, name: str, role: AdminRole, *, actor: str) -> tuple[AdminKey, str]:
        _check_text(name=name)
        key_id = secrets.token_hex(8)
        secret = f"aegis_ak_{key_id}_{new_secret('')}"
        key = AdminKey(key_id, name, role, hash_secret(self._pepper, secret), self._clock.now())
        with self.store.atomic():
            self.store.create_admin_key(key)
            self._event(
                "admin_key.created", actor, f"admin_key:{key_id}", None, role=role.value, name=name
            )
        return key, secret

    def authenticate_admin(self, presented: str) -> AdminKey:
        """Resolve an admin API key; raises ``ClientAuthError(code="unauthenticated")``."""
        fail = ClientAuthError("a valid admin API key is required", code="unauthenticated")
        parts = presented.split("_", 3) if presented.startswith("aegis_ak_") else []
        if len(parts) != 4:
            raise fail
        try:
            key = self.store.get_admin_key(parts[2])
        except NotFound:
            raise fail from None
        if key.revoked or not secret_matches(self._pepper, presented, key.hash):
            raise fail
        return key

    def revoke_admin_key(self, key_id: str, *, actor: str) -> AdminKey:
        with self.store.atomic():
            key = replace(self.store.get_admin_key(key_id), revoked=True)
            self.store.update_admin_key(key)
            self._event("admin_key.revoked", actor, f"admin_key:{key_id}", None)
        return key


def _check_owner(owner: object) -> None:
    """The accountable human's e-mail address, in printable ASCII (a domain in its ``xn--``
    form): an invisible character (a control, a variation selector, a Hangul filler) would
    show as ``alice@example.com`` and compare as someone else in separation of duties."""
    if not (
        isinstance(owner, str)
        and owner.isascii()
        and owner.isprintable()
        and _OWNER_PATTERN.fullmatch(owner)
    ):
        raise InvalidRequest(
            "owner must be the accountable human's e-mail address in printable ASCII (a domain "
            "in its xn-- form)",
            field="owner",
        )


def _check_attributes(attributes: object) -> dict[str, Any]:
    """An agent's attributes: a JSON object nesting at most ``_MAX_ATTRIBUTE_DEPTH`` levels."""
    if not isinstance(attributes, dict):
        raise InvalidRequest("attributes must be a JSON object", field="attributes")

    def walk(value: object, depth: int) -> None:
        if depth > _MAX_ATTRIBUTE_DEPTH:
            raise InvalidRequest(
                f"attributes nest deeper than {_MAX_ATTRIBUTE_DEPTH} levels", field="attributes"
            )
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            for child in value:
                walk(child, depth + 1)

    walk(attributes, 1)
    return dict(attributes)


#: Agent fields of free text, shown in logs, the CLI and approval messages.
_TEXT_FIELDS: Final = ("display_name", "software_version", "model", "roles")


def _check_text(**values: object) -> None:
    """Free text (a name, a version, roles) holds no control or format character: a line
    break or an escape sequence written into a log line or a terminal by a name would forge
    what follows it, and a role spelled with an invisible character would match no rule."""
    for field, value in values.items():
        texts = value if isinstance(value, list | tuple) else (value,)
        for text in texts:
            if isinstance(text, str) and any(unicodedata.category(c) in ("Cc", "Cf") for c in text):
                raise InvalidRequest(
                    f"{field} must not hold control or format characters", field=field
                )
