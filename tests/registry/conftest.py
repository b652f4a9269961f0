"""The registry suite's ``env`` fixture (a frozen clock over real services), for every module."""

from tests.registry.test_service import env  # noqa: F401
