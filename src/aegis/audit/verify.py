"""Offline verification of an audit export (:mod:`aegis.audit.export`) with only the JWKS.

One pass, constant memory: every record must follow the previous one (``seq`` without gaps),
link to it (``prev_hash``), match its own ``hash = sha256(prev_hash || record)``; the Merkle tree is
rebuilt leaf by leaf from a compact range, and every checkpoint must carry a valid signature from a
JWKS key and agree with the rebuilt root and chain head at exactly its ``tree_size``. The export must
end with its ``export`` checkpoint covering every record.

The first problem stops the walk and raises :class:`~aegis.errors.EvidenceError` whose details name
``line`` (1-based line of the file), ``position`` (the record ``seq`` or checkpoint ``tree_size``
concerned) and ``damage``, one of :data:`DAMAGE_KINDS`. A damaged export never verifies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from aegis.audit.checkpoint import Checkpoint, verify_checkpoint
from aegis.audit.export import EXPORT_FORMAT, EXPORT_VERSION
from aegis.audit.log import GENESIS_HASH, record_hash
from aegis.audit.merkle import CompactRange, leaf_hash
from aegis.crypto.jws import StrictJSONError, parse_compact, strict_json
from aegis.crypto.keys import PublicKey
from aegis.errors import EvidenceError

__all__ = ["DAMAGE_KINDS", "ExportSummary", "verify_export"]

DAMAGE_KINDS: Final = (
    "malformed",
    "record_edited",
    "chain_broken",
    "record_missing",
    "records_swapped",
    "records_reordered",
    "checkpoint_signature_invalid",
    "checkpoint_mismatch",
    "checkpoint_misplaced",
    "truncated",
)


@dataclass(frozen=True, slots=True)
class ExportSummary:
    records: int
    first_seq: int | None
    last_seq: int
    checkpoints: int
    root_hash: str
    issuer: str


def _damage(line: int, position: int, damage: str, message: str) -> EvidenceError:
    return EvidenceError(
        f"line {line}, position {position}: {damage}: {message}",
        line=line,
        position=position,
        damage=damage,
    )


def _parse(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            # Strict: a line repeating a member ({"record": forged, ..., "record": real}) would
            # verify as Python reads it (the last) and show a reader keeping the first another
            # record; so would a lone surrogate, which no reader decodes alike.
            obj = strict_json(raw)
        except StrictJSONError as exc:
            raise _damage(number, 0, "malformed", f"the line {exc}") from None
        except ValueError:
            raise _damage(number, 0, "malformed", "not a JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise _damage(number, 0, "malformed", "not a JSON object with a type")
        yield number, obj


_RECORD_FIELDS: Final = {"seq": int, "kind": str, "record": str, "prev_hash": str, "hash": str}


class _Walk:
    def __init__(self, resolve: Callable[[str], PublicKey | None], issuer: str | None) -> None:
        self.resolve, self.issuer = resolve, issuer
        self.tree = CompactRange()
        self.prev = GENESIS_HASH
        self.first: int | None = None
        self.checkpoints = 0
        self.last_checkpoint = -1

    def checkpoint(self, number: int, obj: dict[str, Any], *, end: bool = False) -> Checkpoint:
        token = obj.get("token")
        position = self.tree.size
        if not isinstance(token, str):
            raise _damage(number, position, "malformed", "checkpoint without a token")
        try:
            cp = verify_checkpoint(token, self.resolve, issuer=self.issuer)
        except EvidenceError as exc:
            raise _damage(number, position, "checkpoint_signature_invalid", exc.message) from exc
        if cp.tree_size != self.tree.size:
            raise _damage(
                number,
                cp.tree_size,
                "checkpoint_misplaced" if not end else "truncated",
                f"checkpoint covers {cp.tree_size} records but {self.tree.size} precede it",
            )
        if cp.root_hash != self.tree.root() or cp.chain_hash != self.prev:
            raise _damage(
                number,
                cp.tree_size,
                "checkpoint_mismatch",
                f"records after position {self.last_checkpoint} do not match the signed "
                "checkpoint (edited, or the checkpoint was replaced)",
            )
        if end and cp.purpose != "export":
            raise _damage(number, cp.tree_size, "truncated", "the export checkpoint is missing")
        self.checkpoints += 1
        self.last_checkpoint = cp.tree_size
        return cp

    def record(self, number: int, obj: dict[str, Any], nxt: dict[str, Any] | None) -> None:
        for name, kind in _RECORD_FIELDS.items():
            if type(obj.get(name)) is not kind:
                raise _damage(number, self.tree.size + 1, "malformed", f"record field {name!r}")
        seq, expected = obj["seq"], self.tree.size + 1
        if seq > expected:
            swapped = nxt is not None and nxt.get("seq") == expected
            damage = "records_swapped" if swapped else "record_missing"
            raise _damage(number, expected, damage, f"record {expected} expected, found {seq}")
        if seq < expected:
            raise _damage(number, expected, "records_reordered", f"record {seq} appears again")
        if obj["prev_hash"] != self.prev:
            raise _damage(number, seq, "chain_broken", "prev_hash does not match the record before")
        if record_hash(obj["prev_hash"], obj["record"]) != obj["hash"]:
            raise _damage(number, seq, "record_edited", "the record does not match its hash")
        try:
            inner = json.loads(obj["record"])  # as written: the hash binds the text
        except ValueError:
            raise _damage(number, seq, "record_edited", "the record is not JSON") from None
        if not isinstance(inner, dict) or inner.get("kind") != obj["kind"]:
            raise _damage(number, seq, "record_edited", "the kind column does not match")
        self.tree.append(leaf_hash(obj["record"].encode("utf-8")))
        self.prev = obj["hash"]
        if self.first is None:
            self.first = seq


def verify_export(
    lines: Iterable[str], resolve: Callable[[str], PublicKey | None], *, issuer: str | None = None
) -> ExportSummary:
    """Verify a whole export; raise ``EvidenceError`` (with line, position, damage) at the first
    problem."""
    items = _parse(lines)
    head = next(items, None)
    if head is None:
        raise _damage(1, 0, "truncated", "the export is empty")
    number, obj = head
    if obj.get("type") != "header" or obj.get("format") != EXPORT_FORMAT:
        raise _damage(number, 0, "malformed", "the first line is not an aegis export header")
    if obj.get("version") != EXPORT_VERSION:
        raise _damage(number, 0, "malformed", f"unsupported export version {obj.get('version')}")
    walk = _Walk(resolve, issuer if issuer is not None else obj.get("issuer"))
    peeked: tuple[int, dict[str, Any]] | None = next(items, None)
    if peeked is not None and peeked[1]["type"] == "base":
        number, base = peeked
        size, hashes = base.get("tree_size"), base.get("compact_range")
        if type(size) is not int or size < 1 or not isinstance(hashes, list):
            raise _damage(number, 0, "malformed", "the base line is not a compact range")
        try:
            walk.tree = CompactRange(size, [bytes.fromhex(h) for h in hashes])
        except (TypeError, ValueError):
            raise _damage(number, 0, "malformed", "the base line is not a compact range") from None
        if any(len(h) != 32 for h in walk.tree.hashes):
            raise _damage(number, 0, "malformed", "the base line is not a compact range")
        peeked = next(items, None)
        if peeked is None or peeked[1]["type"] != "checkpoint":
            raise _damage(number, size, "malformed", "the base is not followed by its checkpoint")
        cp = _base_checkpoint(walk, *peeked)
        walk.prev = cp.chain_hash
        peeked = next(items, None)
    while peeked is not None:
        number, obj = peeked
        peeked = next(items, None)
        kind = obj["type"]
        if kind == "record":
            walk.record(number, obj, peeked[1] if peeked is not None else None)
        elif kind == "checkpoint":
            walk.checkpoint(number, obj)
        elif kind == "end":
            cp = walk.checkpoint(number, obj, end=True)
            if obj.get("records") != walk.tree.size - (walk.first or walk.tree.size + 1) + 1:
                raise _damage(number, cp.tree_size, "truncated", "record count does not match")
            # Where the records start is signed: an export cut at its start, with a base made
            # up from the records cut, does not pass for a pruned log's.
            signed_base = parse_compact(obj["token"]).payload.get("base")
            start = walk.first - 1 if walk.first is not None else cp.tree_size
            if signed_base is not None and signed_base != start:
                raise _damage(
                    number, start, "truncated",
                    f"the export starts after {start}, its signed end says after {signed_base}",
                )  # fmt: skip
            if peeked is not None:
                raise _damage(peeked[0], cp.tree_size, "malformed", "lines after the end line")
            return ExportSummary(
                records=obj["records"],
                first_seq=walk.first,
                last_seq=walk.tree.size,
                checkpoints=walk.checkpoints,
                root_hash=cp.root_hash.hex(),
                issuer=cp.issuer,
            )
        else:
            raise _damage(number, walk.tree.size, "malformed", f"unknown line type {kind!r}")
    raise _damage(
        number + 1, walk.tree.size + 1, "truncated", "the export ends without its end line"
    )


def _base_checkpoint(walk: _Walk, number: int, obj: dict[str, Any]) -> Checkpoint:
    """The checkpoint at the prune point: it must sign the base's compact range."""
    token = obj.get("token")
    try:
        cp = verify_checkpoint(str(token), walk.resolve, issuer=walk.issuer)
    except EvidenceError as exc:
        raise _damage(number, walk.tree.size, "checkpoint_signature_invalid", exc.message) from exc
    if cp.tree_size != walk.tree.size or cp.root_hash != walk.tree.root():
        raise _damage(number, cp.tree_size, "checkpoint_mismatch", "the base does not match")
    walk.checkpoints += 1
    walk.last_checkpoint = cp.tree_size
    return cp
