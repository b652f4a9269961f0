"""JSON Lines file sink with size rotation: one record per line, fsynced before the cursor moves.

The current file is ``path``; when it would pass ``max_bytes`` it is renamed to
``<stem>.<first seq>-<last seq><suffix>`` and a new one started, so rotated files sort by position
and none is ever overwritten or deleted here (retention of exported files is the receiver's).
On start the sink reads the last line of the current file (or of the newest rotated one) and reports
its ``seq`` as delivered, so a crash between the write and the cursor update sends nothing twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from aegis.audit.ship import ShippedRecord, SinkDown, SinkRejected

__all__ = ["JsonlSink"]


def _last_seq(path: Path) -> int:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 20)))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for raw in reversed(lines):
        try:
            seq = json.loads(raw)["seq"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash mid-write: earlier lines still count
        return int(seq)
    return 0


def _ends_in_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class JsonlSink:
    def __init__(
        self, path: Path, *, max_bytes: int = 64 * 1024 * 1024, name: str = "jsonl"
    ) -> None:
        self.name, self.path, self.max_bytes = name, path, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def rotated(self) -> list[Path]:
        """Rotated files in order of position (other files in the directory are ignored)."""
        pattern = re.compile(
            rf"{re.escape(self.path.stem)}\.(\d+)-(\d+){re.escape(self.path.suffix)}"
        )
        found = []
        for p in self.path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def delivered(self) -> int:
        seq = _last_seq(self.path)
        if seq == 0 and (old := self.rotated()):
            seq = _last_seq(old[-1])
        return seq

    def _rotate(self) -> None:
        first = self._first_seq()
        last = _last_seq(self.path)
        target = self.path.with_name(f"{self.path.stem}.{first}-{last}{self.path.suffix}")
        n = 0
        while target.exists():  # only a file of torn lines alone (0-0) can meet another
            n += 1
            target = self.path.with_name(f"{self.path.stem}.{first}-{last}{self.path.suffix}.{n}")
        os.replace(self.path, target)

    def _first_seq(self) -> int:
        """The ``seq`` of the first whole line (0: none): a crash during the first write to a
        file leaves its first line torn, and the file must still rotate."""
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    return int(json.loads(raw)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
        return 0

    def send(self, records: list[ShippedRecord]) -> None:
        try:
            text = "".join(r.line() + "\n" for r in records).encode("utf-8")
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(text) > self.max_bytes:
                self._rotate()
            with self.path.open("ab") as f:
                if f.tell() and not _ends_in_newline(self.path):
                    # A line torn by a crash mid-write: end it, so that the next record is a
                    # line of its own, not glued onto the fragment (which readers skip).
                    text = b"\n" + text
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # disk full, permissions: retry later, never skip
            raise SinkDown(f"cannot write {self.path}: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:  # a record no line can hold: dead-lettered
            raise SinkRejected(f"a record cannot be written as a JSON line: {exc}") from exc

    def close(self) -> None:
        return None
