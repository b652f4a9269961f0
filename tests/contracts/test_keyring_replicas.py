"""Several processes changing one key ring at once (replicas starting together, an operator
rotating while the schedule rotates). Each change reads the ring and writes the next one; unless
the read and the write are one locked step, a process writing a ring computed from a stale read
drops keys another process already signs with, and tokens it issued stop verifying."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from aegis.clock import SystemClock
from aegis.crypto.keyring import KeyRing
from aegis.errors import InvalidRequest
from aegis.stores import open_key_store
from aegis.types import KeyState, SigningKeyRecord

REPLICAS = 4

CHANGE_RING = """
import json, sys
from aegis.clock import SystemClock
from aegis.crypto.keyring import KeyRing, KeyRingSettings
from aegis.stores import open_key_store
url, kek, action = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
store = open_key_store(url)
ring = KeyRing(store, kek, SystemClock(), KeyRingSettings(publish_lead=0.0))
sys.stdin.read()  # released together
if action == "init":
    ring.ensure_initialized()
    kid = ring.signing_key().kid
else:
    kid = ring.rotate().kid
print(json.dumps({"active": kid, "signed_with": ring.signing_key().kid}))
store.close()
"""


def _run_together(url: str, kek: bytes, action: str) -> list[dict[str, str]]:
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", CHANGE_RING, url, kek.hex(), action],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(REPLICAS)
    ]
    for p in replicas:  # every replica has opened the store; now change the ring at once
        assert p.stdin is not None
        p.stdin.close()
    results = []
    for p in replicas:
        assert p.stdout is not None and p.stderr is not None
        with p.stdout, p.stderr:
            assert p.wait(120) == 0, p.stderr.read().decode()[-800:]
            results.append(json.loads(p.stdout.read()))
    return results


def test_replicas_initialising_together_agree_on_one_active_key(store_url: str) -> None:
    kek = os.urandom(32)
    results = _run_together(store_url, kek, "init")
    store = open_key_store(store_url)
    try:
        ring = store.list_keys()
    finally:
        store.close()
    assert sorted(r.state.value for r in ring) == ["active", "next"], ring
    active = next(r.kid for r in ring if r.state is KeyState.ACTIVE)
    assert [r["active"] for r in results] == [active] * REPLICAS


def test_rotations_at_once_run_one_after_another(store_url: str) -> None:
    kek = os.urandom(32)
    store = open_key_store(store_url)
    try:
        first = KeyRing(store, kek, SystemClock())
        first.ensure_initialized()
        before = {r.kid for r in store.list_keys()}
        results = _run_together(store_url, kek, "rotate")
        ring = {r.kid: r for r in store.list_keys()}
    finally:
        store.close()
    promoted = [r["active"] for r in results]
    # Each rotation promoted the key the previous one published: four different keys, and
    # every key any replica was signing with is still published (active or retired).
    assert len(set(promoted)) == REPLICAS, promoted
    assert all(kid in ring for kid in promoted), (promoted, sorted(ring))
    assert before <= set(ring)
    states = sorted(r.state.value for r in ring.values())
    assert states == ["active", "next"] + ["retired"] * REPLICAS, states


def test_a_refused_change_leaves_the_ring_as_it_was(store_url: str) -> None:
    store = open_key_store(store_url)
    try:
        KeyRing(store, os.urandom(32), SystemClock()).ensure_initialized()
        ring = store.list_keys()
        oversized = replace(ring[0], kid="k" * 65)
        with pytest.raises(InvalidRequest):
            store.update(lambda records: [*records[1:], oversized])
        with pytest.raises(RuntimeError):
            store.update(_fail)
        assert store.list_keys() == ring
    finally:
        store.close()


def _fail(records: list[SigningKeyRecord]) -> list[SigningKeyRecord]:
    raise RuntimeError("computing the next ring failed")
