"""A tiny in-memory KeyStore for key ring tests (a fake, not a mock: it keeps real records)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

from aegis.errors import NotFound
from aegis.types import KeyState, SigningKeyRecord


class MemoryKeyStore:
    """Holds records in insertion order; ``replace_all`` swaps the whole set at once."""

    def __init__(self) -> None:
        self._records: dict[str, SigningKeyRecord] = {}
        self._update_lock = threading.Lock()

    def list_keys(self) -> list[SigningKeyRecord]:
        return list(self._records.values())

    def put_key(self, record: SigningKeyRecord) -> None:
        self._records[record.kid] = record

    def set_state(
        self,
        kid: str,
        state: KeyState,
        *,
        activated_at: float | None = None,
        retired_at: float | None = None,
        remove_after: float | None = None,
    ) -> None:
        if kid not in self._records:
            raise NotFound(f"no key {kid}")
        self._records[kid] = dataclasses.replace(
            self._records[kid],
            state=state,
            activated_at=activated_at,
            retired_at=retired_at,
            remove_after=remove_after,
        )

    def delete_key(self, kid: str) -> None:
        self._records.pop(kid, None)

    def replace_all(self, records: Sequence[SigningKeyRecord]) -> None:
        self._records = {r.kid: r for r in records}

    def update(
        self, change: Callable[[list[SigningKeyRecord]], Sequence[SigningKeyRecord] | None]
    ) -> list[SigningKeyRecord]:
        with self._update_lock:
            records = change(self.list_keys())
            if records is None:
                return self.list_keys()
            self.replace_all(records)
            return list(records)
