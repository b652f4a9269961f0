"""The error table: every code raised in the package is registered, and package faces are tidy."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import aegis
from aegis.errors import CODES, AegisError, TokenError

SRC = Path(aegis.__file__).parent


def test_every_code_used_in_the_source_is_registered() -> None:
    used: set[str] = set()
    for path in SRC.rglob("*.py"):
        used.update(re.findall(r'code="([a-z_]+)"', path.read_text()))
    assert used, "no codes found: the scan is broken"
    assert sorted(used - set(CODES)) == []


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        AegisError("x", code="definitely_not_a_code")


def test_error_body_has_code_and_no_surprises() -> None:
    err = TokenError("token has expired; request a new one", code="token_expired")
    assert err.status == 401
    assert err.to_dict() == {
        "code": "token_expired",
        "message": "token has expired; request a new one",
    }


def test_unavailable_codes_are_503_and_retryable() -> None:
    for code, spec in CODES.items():
        if code.endswith("_unavailable"):
            assert spec.status == 503 and spec.retryable, code


def _modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages([str(SRC)], "aegis.")
        if not m.name.startswith("aegis.cli")
    ]


@pytest.mark.parametrize("name", _modules())
def test_all_is_sorted_and_names_real_objects(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return

    # isort-style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions.
    def rank(n: str) -> tuple[int, str]:
        return (0 if n.isupper() else 1 if n[:1].isupper() else 2, n)

    assert list(exported) == sorted(exported, key=rank), f"{name}.__all__ is not sorted"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names {item!r}, which does not exist"
