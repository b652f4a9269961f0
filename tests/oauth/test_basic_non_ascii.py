"""A Basic credential holding a non-ASCII byte is a typed, counted 401 ``invalid_client`` at the
OAuth endpoints. ``base64.b64decode(str, validate=True)`` raises a plain ``ValueError`` for a
string holding a non-ASCII character, which is what Starlette hands over for a header byte of
0x80 or more; it was an uncounted plain-text 500.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from aegis.telemetry.metrics import REGISTRY
from tests.support.server import run_server


def _rejections(endpoint: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "aegis_oauth_rejections_total", {"endpoint": endpoint, "code": code}
    )
    return value or 0.0


@pytest.mark.parametrize("endpoint", ["token", "introspect", "revoke"])
def test_basic_auth_with_non_ascii_byte_is_a_typed_counted_401_not_a_500(
    tmp_path: Path, endpoint: str
) -> None:
    with run_server(tmp_path) as srv:
        before = _rejections(endpoint, "invalid_client")
        data = {"grant_type": "client_credentials"} if endpoint == "token" else {"token": "x.y.z"}
        resp = httpx.post(
            f"{srv.url}/oauth/{endpoint}",
            data=data,
            # One byte >= 0x80 in the Basic credential (any client can send it).
            headers={"Authorization": b"Basic \xe9\xe9\xe9\xe9"},
            timeout=5,
        )
        assert resp.status_code == 401, (resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("application/json"), resp.text
        assert resp.json()["error"] == "invalid_client"
        assert _rejections(endpoint, "invalid_client") == before + 1
