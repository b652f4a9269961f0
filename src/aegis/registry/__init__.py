"""The agent registry: identities, clients, life cycles."""

from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService

__all__ = ["AgentSpec", "RegistryCache", "RegistryService"]
