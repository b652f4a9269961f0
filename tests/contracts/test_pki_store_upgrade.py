"""A certificate store made before certificates recorded their enrolling client opens on either
backend: the column is added (once, under the schema lock), earlier records read as enrolled by
no client, and new records keep theirs."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from aegis.clock import SystemClock
from aegis.pki.sql_tables import CERTIFICATES
from aegis.pki.store import CertificateRecord, CertificateStore

_OLD_COLUMNS = [c.name for c in CERTIFICATES.columns if c.name != "enrolled_by"]


def _record(serial: str, **over: object) -> CertificateRecord:
    fields = {"serial": serial, "agent_id": "a", "tenant_id": "t", "env": "prod",
              "spiffe_id": "spiffe://example.org/tenant/t/env/prod/agent/a", "issuer_ski": "00",
              "x5t_s256": "x", "not_before": 1.0, "not_after": 2.0, "issued_at": 1.0, **over}  # fmt: skip
    return CertificateRecord(**fields)  # type: ignore[arg-type]


def test_a_store_made_before_enrolling_clients_were_recorded_opens(sql_url: str) -> None:
    old = CertificateStore(sql_url, clock=SystemClock())
    old.record(_record("01"))
    old.close()
    engine = create_engine(sql_url)
    with engine.begin() as conn:  # back to the earlier table, its row kept
        conn.execute(text(f"CREATE TABLE old_certs AS SELECT {', '.join(_OLD_COLUMNS)} "
                          f"FROM {CERTIFICATES.name}"))  # fmt: skip
        conn.execute(text(f"DROP TABLE {CERTIFICATES.name}"))
        conn.execute(text(f"ALTER TABLE old_certs RENAME TO {CERTIFICATES.name}"))
    with engine.connect() as conn:
        assert "enrolled_by" not in {
            c["name"] for c in inspect(conn).get_columns(CERTIFICATES.name)
        }
    store = CertificateStore(sql_url, clock=SystemClock())
    again = CertificateStore(sql_url, clock=SystemClock())  # a second replica: nothing to add
    try:
        assert store.get("01") == _record("01")
        store.record(_record("02", enrolled_by="a.client"))
        assert again.get("02") == _record("02", enrolled_by="a.client")
    finally:
        store.close()
        again.close()
        engine.dispose()
