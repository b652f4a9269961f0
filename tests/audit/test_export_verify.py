"""Checkpoints, exports and offline verification: every kind of damage is found at its position."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import insert

from aegis.audit.checkpoint import Checkpointer, jwks_resolver, sign_checkpoint, verify_checkpoint
from aegis.audit.log import GENESIS_HASH, AuditLog, canonical_json, record_hash
from aegis.audit.merkle import leaf_hash, root_of
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS, AUDIT_TREE_NODES
from aegis.audit.tree import TreeHead
from aegis.audit.verify import verify_export
from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.keyring import KeyRing
from aegis.errors import EvidenceError
from tests.audit.conftest import ISSUER, dumps, export_text, fill, loads
from tests.crypto.fakes import MemoryKeyStore


def _verify(lines: list[str], keyring: KeyRing) -> None:
    verify_export(lines, jwks_resolver(keyring.jwks()))


def _damage(lines: list[str], keyring: KeyRing) -> tuple[str, int]:
    with pytest.raises(EvidenceError) as info:
        _verify(lines, keyring)
    return info.value.details["damage"], info.value.details["position"]


@pytest.fixture
def exported(log: AuditLog, checkpointer: Checkpointer) -> list[str]:
    fill(log, 5)
    checkpointer.checkpoint()  # a periodic checkpoint after record 5
    fill(log, 4, start=5)
    return export_text(checkpointer)


def _index(lines: list[str], seq: int) -> int:
    return next(i for i, x in enumerate(lines) if loads(x).get("seq") == seq)


def test_an_intact_export_verifies(exported: list[str], keyring: KeyRing) -> None:
    summary = verify_export(exported, jwks_resolver(keyring.jwks()))
    assert (summary.records, summary.first_seq, summary.last_seq) == (9, 1, 9)
    assert summary.checkpoints == 2  # the periodic one and the export's own
    records = [loads(x) for x in exported if loads(x)["type"] == "record"]
    assert summary.root_hash == root_of([leaf_hash(r["record"].encode()) for r in records]).hex()


def test_an_edited_record_is_found(exported: list[str], keyring: KeyRing) -> None:
    i = _index(exported, 3)
    obj = loads(exported[i])
    obj["record"] = obj["record"].replace('"allow"', '"deny"')
    exported[i] = dumps(obj)
    assert _damage(exported, keyring) == ("record_edited", 3)


def test_an_edited_record_with_a_recomputed_chain_fails_at_the_checkpoint(
    exported: list[str], keyring: KeyRing
) -> None:
    from aegis.audit.log import record_hash

    prev = None
    for i, line in enumerate(exported):
        obj = loads(line)
        if obj["type"] != "record":
            continue
        if obj["seq"] == 2:
            obj["record"] = obj["record"].replace('"allow"', '"deny"')
        if prev is not None:
            obj["prev_hash"] = prev
        obj["hash"] = prev = record_hash(obj["prev_hash"], obj["record"])
        exported[i] = dumps(obj)
    assert _damage(exported, keyring) == ("checkpoint_mismatch", 5)


def test_a_deleted_record_is_found(exported: list[str], keyring: KeyRing) -> None:
    del exported[_index(exported, 4)]
    assert _damage(exported, keyring) == ("record_missing", 4)


def test_two_swapped_records_are_found(exported: list[str], keyring: KeyRing) -> None:
    a, b = _index(exported, 6), _index(exported, 7)
    exported[a], exported[b] = exported[b], exported[a]
    assert _damage(exported, keyring) == ("records_swapped", 6)


def test_a_repeated_record_is_found(exported: list[str], keyring: KeyRing) -> None:
    exported.insert(_index(exported, 3), exported[_index(exported, 2)])
    assert _damage(exported, keyring) == ("records_reordered", 3)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_truncated_tail_is_found(exported: list[str], keyring: KeyRing, cut: int) -> None:
    damage, position = _damage(exported[:-cut], keyring)
    assert damage == "truncated"
    assert position == 10 - cut + 1


def test_cutting_back_to_a_periodic_checkpoint_is_found(
    exported: list[str], keyring: KeyRing
) -> None:
    # Keep records 1-5 and the periodic checkpoint, and dress that checkpoint up as the end.
    cp = loads(exported[_index(exported, 5) + 1])
    assert cp["type"] == "checkpoint"
    forged_end = dumps({"type": "end", "records": 5, "token": cp["token"]})
    lines = [*exported[: _index(exported, 5) + 2], forged_end]
    assert _damage(lines, keyring) == ("truncated", 5)


def test_a_replaced_checkpoint_is_found(
    exported: list[str], keyring: KeyRing, clock: FrozenClock
) -> None:
    i = _index(exported, 5) + 1
    forged = sign_checkpoint(
        keyring, issuer=ISSUER, head=TreeHead(5, b"\x11" * 32, "a" * 64), now=clock.now()
    )
    exported[i] = dumps({"type": "checkpoint", "token": forged})
    assert _damage(exported, keyring) == ("checkpoint_mismatch", 5)
    # One of another size in its place (validly signed, wrong position).
    other = sign_checkpoint(
        keyring, issuer=ISSUER, head=TreeHead(3, b"\x11" * 32, "a" * 64), now=clock.now()
    )
    exported[i] = dumps({"type": "checkpoint", "token": other})
    assert _damage(exported, keyring) == ("checkpoint_misplaced", 3)


def test_a_forged_checkpoint_signature_is_found(
    exported: list[str], keyring: KeyRing, clock: FrozenClock
) -> None:
    i = _index(exported, 5) + 1
    token = loads(exported[i])["token"]
    head, payload, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    exported[i] = dumps({"type": "checkpoint", "token": f"{head}.{payload}.{flipped}"})
    assert _damage(exported, keyring) == ("checkpoint_signature_invalid", 5)
    # Signed by a key that is not in the JWKS the auditor holds.
    stranger = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
    stranger.ensure_initialized()
    cp = verify_checkpoint(token, keyring.public_key)
    forged = sign_checkpoint(
        stranger, issuer=ISSUER, head=TreeHead(5, cp.root_hash, cp.chain_hash), now=clock.now()
    )
    exported[i] = dumps({"type": "checkpoint", "token": forged})
    assert _damage(exported, keyring) == ("checkpoint_signature_invalid", 5)


@pytest.mark.parametrize(
    "line", ["not json", "[1]", '{"type":"mystery"}', '{"type":"record","seq":"x"}']
)
def test_garbage_lines_are_malformed(exported: list[str], keyring: KeyRing, line: str) -> None:
    exported.insert(3, line)
    assert _damage(exported, keyring)[0] == "malformed"


def test_an_empty_or_headless_export_never_verifies(exported: list[str], keyring: KeyRing) -> None:
    assert _damage([], keyring)[0] == "truncated"
    assert _damage(exported[1:], keyring)[0] == "malformed"


def test_an_empty_log_exports_and_verifies(checkpointer: Checkpointer, keyring: KeyRing) -> None:
    summary = verify_export(export_text(checkpointer), jwks_resolver(keyring.jwks()))
    assert summary.records == 0 and summary.first_seq is None


def test_a_stored_checkpoint_that_is_not_of_this_log_is_an_error_not_a_cover(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """A row written into the checkpoint table by anyone but this log's checkpointer (larger
    than the log, or of another root) must not be taken as covering the log: it would stop
    checkpointing for good."""
    fill(log, 10)
    genuine = checkpointer.checkpoint()
    assert checkpointer.checkpoint() == genuine  # nothing new: the stored one covers the log
    forged = dataclasses.replace(checkpointer.tree.sync(), size=10**9)
    token = sign_checkpoint(keyring, issuer=ISSUER, head=forged, now=0.0)
    row = {"tree_size": forged.size, "time": 0.0, "root_hash": forged.root.hex(),
           "chain_hash": forged.chain_hash, "token": token}  # fmt: skip
    with log.engine.begin() as conn:
        conn.execute(insert(AUDIT_CHECKPOINTS), [row])
    fill(log, 2, start=10)
    with pytest.raises(EvidenceError, match="does not match the log"):
        checkpointer.checkpoint()


def test_verify_chain_holds_the_log_to_its_checkpoints(
    tmp_path: Path, log: AuditLog, checkpointer: Checkpointer
) -> None:
    """A chain recomputed after an edit, or cut short, verifies link by link; the chain heads the
    checkpoints recorded are what it must still reach."""
    fill(log, 5)
    checkpointer.checkpoint()  # witnesses the head at 5
    fill(log, 5, start=5)
    checkpointer.checkpoint()  # and at 10
    assert log.verify_chain().ok
    db = sqlite3.connect(tmp_path / "audit.db")
    try:
        db.execute("DELETE FROM audit_records WHERE seq > 7")
        db.commit()
        cut = log.verify_chain()
        assert (cut.ok, cut.reason) == (False, "records up to the checkpoint at 10 are missing")
        prev = GENESIS_HASH  # rewrite record 3 and recompute every hash after it
        rows = db.execute("SELECT seq, record FROM audit_records ORDER BY seq").fetchall()
        for seq, body in rows:
            record = json.loads(body)
            record["action"] = "deny" if seq == 3 else record["action"]
            text = canonical_json(record)
            digest = record_hash(prev, text)
            db.execute(
                "UPDATE audit_records SET record = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (text, prev, digest, seq),
            )
            prev = digest
        db.commit()
    finally:
        db.close()
    rewritten = log.verify_chain()
    assert (rewritten.first_bad, rewritten.reason) == (
        5, "the chain head differs from the checkpoint at this size")  # fmt: skip


def test_a_kid_two_key_sets_give_different_keys_is_refused(tmp_path: Path) -> None:
    """An archived key set handed over by whoever is audited could re-publish a trusted kid with
    a key of its own, and forged checkpoints would verify with it: refused, whichever file comes
    first. The same key in two files (an archive overlapping the current set) is one key."""
    from aegis.cli.audit import load_jwks
    from aegis.crypto.keys import Ed25519SigningKey

    real, evil = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    trusted = {"keys": [{**real.public.to_jwk(), "kid": "k1"}]}
    rebinding = {"keys": [{**evil.public.to_jwk(), "kid": "k1"}]}
    files = []
    for name, doc in (("trusted", trusted), ("old", rebinding), ("again", trusted)):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        files.append(tmp_path / f"{name}.json")
    for order in ([files[0], files[1]], [files[1], files[0]]):
        with pytest.raises(EvidenceError, match="two different keys"):
            load_jwks(order)
    resolve = load_jwks([files[0], files[2]])
    assert resolve("k1") is not None and resolve("k1").to_jwk() == real.public.to_jwk()  # type: ignore[union-attr]


@pytest.mark.parametrize("where", ["next leaf", "leaf and its parents", "a later leaf"])
def test_tree_nodes_inserted_outside_the_checkpointer_are_never_signed(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing, where: str
) -> None:
    """The tree's size is read from the stored nodes, and INSERT on them is all a role needs to
    write one: a leaf stored for the next position would stand in for the real record in the
    next signed root, with an inclusion proof to show for it. Nodes past the newest checkpoint
    this log signed are recomputed from the records first; any difference refuses to sign (or
    export), and nothing is signed over them."""
    fill(log, 3)
    signed = checkpointer.checkpoint()
    fake = canonical_json({"decision_id": "d-fake", "action": "allow", "kind": "gateway.decision"})
    cr = checkpointer.tree.compact_range(3)
    rows = [
        {"level": lv, "idx": ix, "hash": h} for lv, ix, h in cr.append(leaf_hash(fake.encode()))
    ]
    if where == "next leaf":
        rows = [r for r in rows if r["level"] == 0]
    elif where == "a later leaf":  # past a gap: the size read from the nodes skips records
        rows = [{"level": 0, "idx": 6, "hash": leaf_hash(fake.encode())}]
    with log.engine.begin() as conn:
        conn.execute(insert(AUDIT_TREE_NODES), rows)
    fill(log, 4, start=3)
    with pytest.raises(EvidenceError, match="something other than Aegis"):
        checkpointer.checkpoint()
    with pytest.raises(EvidenceError, match="something other than Aegis"):
        checkpointer.head_for_export()
    assert checkpointer.latest() == signed  # nothing was signed over the stored nodes


def test_nodes_planted_while_a_checkpoint_is_taken_are_never_signed(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """A checkpoint row larger than the synced tree sends the checkpointer to sync again (another
    process may have appended and checkpointed): that second sync verifies the nodes past the
    newest checkpoint this log signed too, so a leaf planted in between, behind a checkpoint
    row nobody signed, is never signed over."""
    fill(log, 3)
    signed = checkpointer.checkpoint()
    fake = canonical_json({"decision_id": "d-fake", "action": "allow", "kind": "gateway.decision"})
    tree, real_sync = checkpointer.tree, checkpointer.tree.sync
    planted = [{"level": lv, "idx": ix, "hash": h}
               for lv, ix, h in tree.compact_range(3).append(leaf_hash(fake.encode()))]  # fmt: skip

    def sync_then_plant(*, trusted: int | None = None) -> TreeHead:
        head = real_sync(trusted=trusted)
        if head.size == 3:  # between the checkpointer's two syncs
            other = KeyRing(MemoryKeyStore(), random_bytes(32), FrozenClock(0.0))
            other.ensure_initialized()
            row_head = dataclasses.replace(head, size=4)
            token = sign_checkpoint(other, issuer=ISSUER, head=row_head, now=0.0)
            with log.engine.begin() as conn:
                conn.execute(insert(AUDIT_CHECKPOINTS), [{
                    "tree_size": 4, "time": 0.0, "root_hash": head.root.hex(),
                    "chain_hash": head.chain_hash, "token": token}])  # fmt: skip
                conn.execute(insert(AUDIT_TREE_NODES), planted)
            fill(log, 4, start=3)
        return head

    tree.sync = sync_then_plant  # type: ignore[method-assign]
    try:
        with pytest.raises(EvidenceError, match="something other than Aegis"):
            checkpointer.checkpoint()
    finally:
        tree.sync = real_sync  # type: ignore[method-assign]
    assert all(cp.tree_size in (3, 4) for cp in checkpointer.all())  # nothing signed over it
    assert checkpointer._trusted_size() == signed.tree_size


def test_honest_checkpoints_verify_what_was_synced_since_the_last(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """A sync without a stored checkpoint (an export) leaves nodes past the newest checkpoint:
    they are the records' own, so the next checkpoint verifies them and signs."""
    fill(log, 5)
    checkpointer.checkpoint()
    fill(log, 6, start=5)
    checkpointer.head_for_export()  # the tree grows to 11, no checkpoint stored
    fill(log, 2, start=11)
    assert checkpointer.checkpoint().tree_size == 13
    summary = verify_export(export_text(checkpointer), jwks_resolver(keyring.jwks()))
    assert summary.records == 13


def test_an_export_cut_at_its_start_does_not_pass_for_a_pruned_logs(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """Records 1-5 cut from an unpruned export and replaced by a base computed from them read,
    link by link and checkpoint by checkpoint, as a log pruned at 5. The end checkpoint signs
    where the records start, so the cut is named."""
    from aegis.audit.merkle import CompactRange

    fill(log, 5)
    checkpointer.checkpoint()
    fill(log, 4, start=5)
    lines = export_text(checkpointer)
    objs = [loads(x) for x in lines]
    assert verify_export(lines, jwks_resolver(keyring.jwks())).first_seq == 1
    dropped = [o for o in objs if o["type"] == "record" and o["seq"] <= 5]
    frontier = CompactRange()
    for o in dropped:
        frontier.append(leaf_hash(o["record"].encode()))
    at_five = next(o for o in objs if o["type"] == "checkpoint")
    rest = [o for o in objs[1:] if o not in dropped and o is not at_five]
    rest[-1]["records"] = 4
    base = {"type": "base", "tree_size": 5, "compact_range": [h.hex() for h in frontier.hashes]}
    forged = [lines[0], dumps(base), dumps(at_five), *(dumps(o) for o in rest)]
    with pytest.raises(
        EvidenceError, match=r"truncated.*starts after 5, its signed end says after 0"
    ):
        verify_export(forged, jwks_resolver(keyring.jwks()))


def test_an_export_line_repeating_a_member_is_malformed(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """{"record": forged, ..., "record": real} verifies as Python reads it (the last member); a
    reader keeping the first would be shown the forged record in an export called intact."""
    fill(log, 3)
    lines = export_text(checkpointer)
    i = next(n for n, line in enumerate(lines) if loads(line).get("seq") == 2)
    forged = loads(lines[i])["record"].replace('"allow"', '"deny"')
    lines[i] = '{"record":' + json.dumps(forged) + "," + lines[i][1:]
    assert _damage(lines, keyring) == ("malformed", 0)


def test_verify_chain_holds_the_kind_column_to_the_record(
    tmp_path: Path, log: AuditLog, checkpointer: Checkpointer
) -> None:
    """The column is outside the hash, and what records(kind=...) and every sink read."""
    fill(log, 5)
    checkpointer.checkpoint()
    with sqlite3.connect(tmp_path / "audit.db") as db:
        db.execute("UPDATE audit_records SET kind = 'gateway.heartbeat' WHERE seq = 3")
    report = log.verify_chain()
    assert (report.ok, report.first_bad) == (False, 3)
    assert report.reason == "the kind column does not match the record"


def test_a_record_holding_a_lone_surrogate_verifies(
    log: AuditLog, checkpointer: Checkpointer, keyring: KeyRing
) -> None:
    """Stored ASCII-escaped (its one canonical text), it is read as written everywhere."""
    fill(log, 2)
    log.append("approval.requested", {"decision_id": "d-x", "parameters": {"note": "\ud800"}})
    assert log.verify_chain().ok
    _verify(export_text(checkpointer), keyring)
