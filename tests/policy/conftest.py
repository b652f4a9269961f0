"""Shared fixtures: the policy corpus, compiled once per session, and its Rego engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegis.policy.evaluator import CompiledPolicy, compile_policy
from aegis.policy.loader import load_file
from tests.policy.regorus_engine import RegoEngine

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "corpus").glob("*.yaml"))
REPO = HERE.parent.parent

_compiled: dict[str, CompiledPolicy] = {}
_engines: dict[str, RegoEngine] = {}


def corpus_policy(name: str) -> CompiledPolicy:
    if name not in _compiled:
        _compiled[name] = compile_policy(load_file(HERE / "corpus" / f"{name}.yaml"))
    return _compiled[name]


def corpus_engine(name: str) -> RegoEngine:
    if name not in _engines:
        _engines[name] = RegoEngine(corpus_policy(name))
    return _engines[name]


@pytest.fixture
def payments() -> CompiledPolicy:
    return corpus_policy("payments")
