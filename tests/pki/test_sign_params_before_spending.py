"""``POST /pki/v1/sign`` reads the request whole before it spends the single-use bootstrap
token: a ``lifetime`` of 0 (or of thousands of digits) is a typed 400 and the token still works
for the corrected retry. Before, the typo burnt the enrolment token. A Basic credential holding a
non-ASCII byte is a typed, counted 401, not a plain-text 500.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.applications import Starlette

from aegis.clock import FrozenClock
from aegis.pki.api import PkiEndpoints
from aegis.telemetry.metrics import REGISTRY
from tests.gateway.harness import serve
from tests.pki.conftest import build_pki, make_csr


def test_bootstrap_token_is_not_spent_by_a_request_refused_for_its_lifetime(
    tmp_path: Path,
) -> None:
    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=64 * 1024).routes())
    token = pki.service.new_bootstrap_token("beta", lifetime=600)
    try:
        with serve(app) as base:
            bad = httpx.post(
                f"{base}/pki/v1/sign",
                data={"csr": make_csr()[1].decode(), "bootstrap_token": token, "lifetime": "0"},
                timeout=5,
            )
            assert bad.status_code == 400, bad.text
            assert bad.json()["code"] == "invalid_request"
            retry = httpx.post(
                f"{base}/pki/v1/sign",
                data={"csr": make_csr()[1].decode(), "bootstrap_token": token},
                timeout=5,
            )
            # A refused request spends nothing (as a malformed CSR does not).
            assert retry.status_code == 201, retry.text
    finally:
        pki.store.close()


def test_sign_with_non_ascii_basic_credential_is_a_typed_counted_401(tmp_path: Path) -> None:
    pki = build_pki(tmp_path)
    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=64 * 1024).routes())
    labels = {"endpoint": "pki_sign", "code": "invalid_client"}
    before = REGISTRY.get_sample_value("aegis_oauth_rejections_total", labels) or 0.0
    try:
        with serve(app) as base:
            resp = httpx.post(
                f"{base}/pki/v1/sign",
                data={"csr": make_csr()[1].decode()},
                headers={"Authorization": b"Basic \xff\xfe\xfd\xfc"},
                timeout=5,
            )
        assert resp.status_code == 401, (resp.status_code, resp.text)
        assert resp.json()["code"] == "invalid_client"
        after = REGISTRY.get_sample_value("aegis_oauth_rejections_total", labels) or 0.0
        assert after == before + 1
    finally:
        pki.store.close()


def test_sign_with_overlong_lifetime_is_a_typed_400_not_a_500(tmp_path: Path) -> None:
    """``lifetime`` passes the ``isdigit`` check, then ``int()`` refuses more than 4300 digits
    (ValueError, not an AegisError): 500 text/plain, uncounted."""
    pki = build_pki(tmp_path)
    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=64 * 1024).routes())
    try:
        with serve(app) as base:
            resp = httpx.post(
                f"{base}/pki/v1/sign",
                data={"csr": make_csr()[1].decode(), "lifetime": "9" * 5000},
                auth=pki.secrets["alpha"],
                timeout=5,
            )
        assert resp.status_code == 400, (resp.status_code, resp.text[:200])
        assert resp.json()["code"] == "invalid_request"
    finally:
        pki.store.close()
