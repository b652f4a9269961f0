"""Content-addressed policy versions: ``sha256:`` + SHA-256 of the canonical JSON document.

Canonical JSON here is the validated document with defaults filled in (so spelling a default out
does not make a new version), keys sorted, no insignificant whitespace, UTF-8. Two documents that
mean the same thing under the schema hash the same; any change that can alter a decision changes
the version, and every decision names the version it used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from aegis.policy.model import PolicyDocument

__all__ = ["VERSION_PREFIX", "canonical_json", "policy_version", "short_version"]

VERSION_PREFIX: Final = "sha256:"


def canonical_json(value: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8; the bytes that are hashed and stored."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def policy_version(doc: PolicyDocument) -> str:
    """The content address of a validated document, e.g. ``sha256:3f2a...`` (64 hex digits)."""
    return VERSION_PREFIX + hashlib.sha256(canonical_json(doc.canonical())).hexdigest()


def short_version(version: str, length: int = 12) -> str:
    """A display form such as ``sha256:3f2a9c01b2d4``; never use it to look a version up."""
    return version[: len(VERSION_PREFIX) + length]
