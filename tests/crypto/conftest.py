"""Shared fixtures for the crypto tests: vector files and a frozen key ring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load_vectors(name: str) -> Any:
    """Load a vector file from tests/vectors (see SOURCES.md for where each comes from)."""
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))
