"""Aegis: identity, policy and audit gateway for multi-agent AI systems."""

__all__ = ["__version__"]

__version__ = "0.1.0"
