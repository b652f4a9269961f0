"""What the control plane's router refuses (``GET /oauth/token``, an unknown path) is typed JSON
and counted, as every other refusal; it was Starlette's plain text, with no stable code and
uncounted.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from aegis.telemetry.metrics import REGISTRY
from tests.support.server import run_server


def test_wrong_method_on_the_token_endpoint_is_a_typed_counted_json_refusal(
    tmp_path: Path,
) -> None:
    labels = {"endpoint": "token", "code": "method_not_allowed"}
    with run_server(tmp_path) as srv:
        before = REGISTRY.get_sample_value("aegis_oauth_rejections_total", labels) or 0.0
        resp = httpx.get(f"{srv.url}/oauth/token", timeout=5)
        assert resp.status_code == 405
        assert resp.headers["content-type"].startswith("application/json"), resp.text
        assert resp.json()["error"] == "invalid_request"
        after = REGISTRY.get_sample_value("aegis_oauth_rejections_total", labels) or 0.0
        assert after == before + 1


def test_unknown_control_plane_path_is_a_typed_json_404(tmp_path: Path) -> None:
    with run_server(tmp_path) as srv:
        resp = httpx.post(f"{srv.url}/oauth/tokens", data={"grant_type": "x"}, timeout=5)
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    assert resp.json()["code"] == "not_found"
