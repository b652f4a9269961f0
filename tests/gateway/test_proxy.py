"""Reverse-proxy rules that need no network: header hygiene (RFC 9110 §7.6.1), route matching and
the request paths refused because an upstream could resolve them to another route (RFC 3986 §5.2.4);
and the request framing the mTLS listener's parser accepts, sent through it on loopback."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.config import GatewayRoute, GatewaySettings
from aegis.crypto.jws import fold_name
from aegis.errors import ConfigError, InvalidRequest
from aegis.gateway.fields import is_encoded, parse_json_body, proxy_claim, vet_fields
from aegis.gateway.hygiene import forwardable, joined
from aegis.gateway.names import name_keys
from aegis.gateway.proxy import ReverseProxy
from aegis.gateway.routing import RouteTable
from aegis.gateway.target import MAX_QUERY_PARAMETERS, vet_path, vet_query
from aegis.pki.listener import MTLSListener
from tests.audit.receivers import make_ca
from tests.gateway.conftest import Agent, Env, dpop_headers
from tests.pki.harness import close_writer


def test_hop_by_hop_and_connection_named_fields_are_dropped() -> None:
    pairs = [
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Aegis-Agent-Id", "admin"),
        ("x-aegis-attestation", "forged"),
        ("Authorization", "DPoP t"),
        ("DPoP", "p"),
        ("Content-Type", "application/json"),
        ("Accept", "*/*"),
    ]
    out = forwardable(pairs, frozenset({"authorization", "dpop"}))
    assert out == [("content-type", "application/json"), ("accept", "*/*")]


@pytest.mark.parametrize(
    "name",
    ["client-cert", "Client-Cert-Chain", "x-ssl-client-cert", "X_SSL_Client_Verify",
     "ssl_client_cert", "ssl-client-verify", "ssl_client_s_dn", "ssl-client-s-dn-cn",
     "ssl_client_i_dn", "ssl_client_m_serial", "x-arr-clientcert", "x-amzn-mtls-clientcert-leaf",
     "x-client-cert", "x-client-dn"],
)  # fmt: skip
def test_a_certificate_a_proxy_would_vouch_for_is_a_claim(name: str) -> None:
    """Apache mod_ssl's SSL_CLIENT_* family whole (the subject DN is what upstreams authorise
    on), RFC 9440's pair, and the other proxies' names: a caller's copy reaches no upstream."""
    assert proxy_claim(name.lower())


def test_identity_fields_are_dropped_however_spelled() -> None:
    pairs = [
        ("X_Aegis_Agent_Id", "admin"),
        ("x-aegis_tenant", "other"),
        ("Proxy-Status", "x"),
        ("Proxy-Authentication-Info", "y"),
        ("X-Aegis", "kept: not an Aegis field name"),
        ("X-Trace_Id", "1"),
    ]
    assert forwardable(pairs, frozenset()) == [
        ("x-aegis", "kept: not an Aegis field name"),
        ("x-trace_id", "1"),
    ]


def test_repeated_fields_are_joined_as_rfc_9110_reads_them() -> None:
    pairs = [("accept", "a"), ("cookie", "s=1"), ("accept", "b"), ("cookie", "t=2")]
    assert joined(pairs) == {"accept": "a, b", "cookie": "s=1; t=2"}


def test_longest_prefix_and_host_win() -> None:
    settings = GatewaySettings.model_validate(
        {
            "routes": [
                {"path_prefix": "/", "upstream": "http://a", "tool": "any", "tenant": "t", "env": "e"},
                {"path_prefix": "/pay", "upstream": "http://b", "tool": "pay", "tenant": "t", "env": "e"},
                {"path_prefix": "/pay", "host": "pay.example", "upstream": "http://c", "tool": "pay2",
                 "tenant": "t", "env": "e"},
            ]
        }
    )  # fmt: skip
    proxy = ReverseProxy(None, settings)  # type: ignore[arg-type]
    assert proxy.match("gw:8443", "/pay/x").tool == "pay"  # type: ignore[union-attr]
    assert proxy.match("PAY.example:8443", "/pay").tool == "pay2"  # type: ignore[union-attr]
    assert proxy.match("gw", "/payments").tool == "any"  # type: ignore[union-attr]
    assert proxy.match("gw", "/other").tool == "any"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("routes", "host", "path", "tool"),
    [
        # A host's routes are the only ones for it, however long another prefix is: nginx picks
        # the server block, Envoy the virtual host, before any path.
        ((("/", "admin", "admin.example.com"), ("/payments", "payments", None)),
         "admin.example.com", "/payments/charge", "admin"),
        ((("/payments", "admin", "admin.example.com"), ("/payments/", "payments", None)),
         "Admin.Example.com.:8443", "/payments/x", "admin"),
        ((("/payments", "admin", "admin.example.com"), ("/payments/refunds", "refunds", None)),
         "admin.example.com", "/payments/refunds/1", "admin"),
        # Other hosts never reach a host's routes.
        ((("/", "admin", "admin.example.com"), ("/payments", "payments", None)),
         "gw.example.com", "/payments/charge", "payments"),
        ((("/", "admin", "admin.example.com"),), "gw.example.com", "/x", None),
    ],
)  # fmt: skip
def test_the_host_chooses_its_routes_before_any_path(
    routes: tuple[tuple[str, str, str | None], ...], host: str, path: str, tool: str | None
) -> None:
    table = _table(*routes)
    for route in (table.match(host, path), table.match_exact(host, path)):
        assert (route.tool if route else None) == tool


def test_a_prefix_written_with_a_trailing_slash_is_literal_to_the_proxy_in_front() -> None:
    """Envoy's ``prefix: /payments/`` sends ``/payments`` to the catch-all: the exact reading
    says so, and the ext_authz doors refuse the call the two readings place differently."""
    table = _table(("/", "public", None), ("/payments/", "payments", None))
    assert table.match_exact("gw", "/payments").tool == "public"  # type: ignore[union-attr]
    assert table.match_exact("gw", "/payments/x").tool == "payments"  # type: ignore[union-attr]
    assert table.match("gw", "/payments").tool == "payments"  # type: ignore[union-attr]


def test_route_without_catch_all_does_not_match_other_paths() -> None:
    settings = GatewaySettings.model_validate(
        {
            "routes": [
                {
                    "path_prefix": "/pay/",
                    "upstream": "http://b",
                    "tool": "pay",
                    "tenant": "t",
                    "env": "e",
                }
            ]
        }
    )
    proxy = ReverseProxy(None, settings)  # type: ignore[arg-type]
    assert proxy.match("gw", "/payx") is None
    assert proxy.match("gw", "/pay") is not None


def _table(*routes: tuple[str, str, str | None]) -> RouteTable:
    return RouteTable(
        GatewayRoute.model_validate(
            {"path_prefix": prefix, "upstream": "http://u", "tool": tool, "tenant": "t",
             "env": "e", "host": host}
        )
        for prefix, tool, host in routes
    )  # fmt: skip


@pytest.mark.parametrize(
    "path",
    ["/admin/users", "/Admin/users", "/ADMIN", "/admin;x/users", "/admin;/users",
     "/admin./users", "/admin /users", "/admin. ./users", "/admin;jsessionid=1"],
)  # fmt: skip
def test_paths_an_upstream_reads_as_under_a_prefix_are_decided_under_it(path: str) -> None:
    # Express matches case-insensitively, Tomcat drops ;parameters, IIS trailing dots and spaces:
    # each serves these as /admin/..., so the call is not decided as the catch-all's tool.
    table = _table(("/", "public", None), ("/admin", "admin", None))
    route = table.match("gw", vet_path(path.replace(" ", "%20")))
    assert route is not None and route.tool == "admin"


@pytest.mark.parametrize("path", ["/administrator", "/adminx/users", "/admi", "/x/admin"])
def test_other_paths_stay_with_the_catch_all(path: str) -> None:
    table = _table(("/", "public", None), ("/admin", "admin", None))
    route = table.match("gw", path)
    assert route is not None and route.tool == "public"


@pytest.mark.parametrize("host", ["[fd00::1]", "[FD00::1]", "[fd00::1]:8443", "[Fd00::1]:443"])
def test_an_ipv6_literal_chooses_its_route_whatever_its_case_and_port(host: str) -> None:
    table = _table(("/", "open", None), ("/", "v6-locked", "[fd00::1]"))
    route = table.match(host, "/x")
    assert route is not None and route.tool == "v6-locked"


def test_a_string_prefix_clash_is_named() -> None:
    table = _table(("/", "public", None), ("/billing", "billing", None))
    for path in ("/billingX/charge", "/billing-archive"):
        route = table.match("gw", path)
        assert route is not None and route.tool == "public"
        assert table.clash("gw", path, route) == "/billing"
    for path in ("/billing/charge", "/other"):
        route = table.match("gw", path)
        assert route is not None and table.clash("gw", path, route) is None


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("/payments/charge", "/payments/charge"),
        ("/payments/a%20b%3Fc", "/payments/a b?c"),
        ("/payments/v1.2/..x/.well", "/payments/v1.2/..x/.well"),
        ("/payments/%41%2e1", "/payments/A.1"),
        ("/payments/caf%C3%A9", "/payments/caf\u00e9"),
        ("/payments/%EF%BD%81", "/payments/\uff41"),  # FULLWIDTH a: no separator once normalised
    ],
)
def test_paths_that_read_the_same_everywhere_pass(raw: str, decoded: str) -> None:
    assert vet_path(raw) == decoded


@pytest.mark.parametrize(
    "raw",
    [
        "/payments/../admin",
        "/payments/..",
        "/payments/./x",
        "/payments/%2e%2E/admin",
        "/payments/.%2e/admin",
        "/payments/..;jsessionid=1/admin",
        "/payments%2F..%2Fadmin",
        "/payments%2fx",
        "/payments/..%5cadmin",
        "/payments\\..\\admin",
        "/payments/%252e%252e/admin",
        "/payments/%00",
        "/payments/%0d%0aX-Injected:%201",
        "/payments/%ff",
        "payments/x",
        "*",
        "/payments/refund#x",
        "/payments/#",
        "/payments//x",  # nginx merges slashes: //admin/x is served as /admin/x
        "//admin/x",
        "/%EF%BC%8E%EF%BC%8E/admin",  # FULLWIDTH FULL STOPs: '..' once NFKC-normalised
        "/payments/%EF%BC%8Fadmin",  # FULLWIDTH SOLIDUS: '/' once normalised
        "/admin/;/users",  # Tomcat drops ";" and merges the empty segment left
        "/payments/admin/.%20/users",  # IIS trims dots and spaces: an empty segment
        "/payments/admin/%20/users",
        "/payments/..%20/admin",
        "/admin/%EF%BC%9Bx/users",  # FULLWIDTH SEMICOLON: an empty segment once normalised
        "/admin%EF%BC%9Fx",  # FULLWIDTH QUESTION MARK: the path ends there once normalised
        "/admin%EF%BC%83x",  # FULLWIDTH NUMBER SIGN
        "/public/%u002e%u002e/payments",  # IIS (http.sys) reads %uNNNN: '..'
        "/public/%U002E%U002E/payments",
        "/public/x%u002f..%u002fpayments",  # '/'
        "/public/%uff0e%uff0e/payments",  # FULLWIDTH FULL STOPs, never decoded here
        "/payments/100%",  # a '%' that starts no encoding
        "/payments/%4",
        "/payments/%g0",
    ],
)
def test_paths_another_server_could_read_differently_are_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        vet_path(raw)


@pytest.mark.parametrize(
    "raw",
    [b'{"amount": 5000, "amount": 5}', b'{"a": {"b": 1, "b": 2}}', b'[{"k": 1}, {"k": 1, "k": 1}]'],
)
def test_a_json_body_repeating_a_member_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="repeats the JSON member"):
        parse_json_body(raw, "application/json")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=12))  # fmt: skip
def test_json_without_repeats_reads_as_the_standard_decoder_reads_it(value: object) -> None:
    raw = json.dumps(value).encode()
    if _case_twins(value):  # names that differ only in case are refused, nothing else
        with pytest.raises(InvalidRequest, match="differ only in case"):
            parse_json_body(raw, "application/json")
    else:
        assert parse_json_body(raw, "application/json") == json.loads(raw)


@pytest.mark.parametrize("number", [2**53 + 1, -(2**53) - 1, 10**30])
def test_an_integer_readers_would_round_is_refused(number: int) -> None:
    """JavaScript's JSON.parse and Go's interface{} read 9007199254740993 as 9007199254740992:
    policy and such an upstream would read two numbers."""
    raw = json.dumps({"to": number}).encode()
    with pytest.raises(InvalidRequest, match="send it as a string"):
        parse_json_body(raw, "application/json", safe_integers=True)
    # Where policy does not read the body (an int64 id for a typed upstream), it passes.
    assert parse_json_body(raw, "application/json") == {"to": number}
    exact = json.dumps({"to": 2**53}).encode()
    assert parse_json_body(exact, "application/json", safe_integers=True) == {"to": 2**53}


def _case_twins(value: object) -> bool:
    if isinstance(value, dict):
        folded = {fold_name(str(k)) for k in value}
        return len(folded) != len(value) or any(_case_twins(v) for v in value.values())
    if isinstance(value, list):
        return any(_case_twins(v) for v in value)
    return False


@pytest.mark.parametrize(
    ("path", "tool", "other"),
    [("/admin.json", "public", "/admin"), ("/Admin.JSON/", "public", "/admin"),
     ("/payments/refund.json", "payments", "/payments/refund"),
     ("/files/public.pdf", "files", "/files/public"), ("/payments/refund/", "refunds", None),
     ("/adm\u0131n/users", "admin", None), ("/openapi.json", "spec", None),
     ("/openapi", "public", None), ("/payments/x.json", "payments", None),
     ("/files/public/a.pdf", "public", None), ("/api/v1.2/items.json", "api", None),
     ("/api/v1.2/items/", "api", None), ("/payments/setup.exe/", "payments", None)],
)  # fmt: skip
def test_a_path_another_reading_routes_elsewhere_is_refused(
    path: str, tool: str, other: str | None
) -> None:
    """Rails serves ``/admin.json`` as ``/admin`` and Express ``/refund/`` as ``/refund``, an
    exact upstream serves ``/files/public.pdf`` as a file under ``/files``: when the two
    readings fall under different routes the call is refused, not guessed. Java and .NET
    compare U+0131 equal to ``i``."""
    table = _table(("/", "public", None), ("/admin", "admin", None),
                   ("/payments", "payments", None), ("/payments/refund", "refunds", None),
                   ("/openapi.json", "spec", None), ("/files", "files", None),
                   ("/files/public", "public", None), ("/api/v1.2", "api", None))  # fmt: skip
    route = table.match("gw", vet_path(path))
    assert route is not None and route.tool == tool
    why = table.read_as_another("gw", vet_path(path), route)
    if other is None:
        assert why is None
    else:
        assert why is not None and repr(other) in why


def test_a_path_in_fullwidth_letters_is_decided_under_the_route_it_normalises_to() -> None:
    table = _table(("/", "public", None), ("/admin", "admin", None))
    route = table.match("gw", vet_path("/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E/users"))
    assert route is not None and route.tool == "admin"


@pytest.mark.parametrize(
    ("query", "params"),
    [("", ()), ("a=1&b=2", (("a", "1"), ("b", "2"))), ("a=%3B&a=2", (("a", ";"), ("a", "2"))),
     ("q=line%0Abreak", (("q", "line\nbreak"),)), ("caf%C3%A9=%E2%82%AC", (("café", "€"),))],
)  # fmt: skip
def test_queries_that_read_the_same_everywhere_pass(
    query: str, params: tuple[tuple[str, str], ...]
) -> None:
    assert vet_query(query) == params


@pytest.mark.parametrize(
    "query",
    ["action=read;action=delete", "a=1#x", "action%00=delete", "a%0D=1", "a=%00",
     "account=vict%FFim", "caf%E9=1", "action=%u0064elete", "a=100%", "a=%4", "%u0061=1"],
)  # fmt: skip
def test_queries_another_server_could_read_differently_are_refused(query: str) -> None:
    with pytest.raises(InvalidRequest):
        vet_query(query)


def test_a_query_longer_than_the_parameter_limit_is_refused() -> None:
    # Express and PHP keep the first 1,000 parameters: ``dry_run`` past them, or past 1,000
    # bare ``&``, never reaches such an upstream while policy reads it.
    padded = "&" * MAX_QUERY_PARAMETERS + "dry_run=true"
    with pytest.raises(InvalidRequest, match=f"more than {MAX_QUERY_PARAMETERS} parameters"):
        vet_query(padded)
    with pytest.raises(InvalidRequest, match=f"more than {MAX_QUERY_PARAMETERS} parameters"):
        vet_query("&".join(f"p{i}=" for i in range(MAX_QUERY_PARAMETERS)) + "&dry_run=true")
    limit = "&".join(f"p{i}=" for i in range(MAX_QUERY_PARAMETERS - 1)) + "&dry_run=true"
    assert vet_query(limit)[-1] == ("dry_run", "true")


@pytest.mark.parametrize("coding", ["gzip", "br", "identity, br", " X-Custom "])
def test_a_content_coded_body_is_not_read_as_json(coding: str) -> None:
    assert is_encoded(coding)
    assert parse_json_body(b'{"amount": 5}', "application/json", coding) is None


@pytest.mark.parametrize("coding", [None, "", "identity", "Identity, identity"])
def test_a_body_without_a_content_coding_is_read(coding: str | None) -> None:
    assert not is_encoded(coding)
    assert parse_json_body(b'{"amount": 5}', "application/json", coding) == {"amount": 5}


def test_a_json_body_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="surrogate"):
        parse_json_body(b'{"memo": "\\ud800"}', "application/json")
    # An escaped pair is one character, and fine.
    assert parse_json_body(b'{"memo": "\\ud83d\\ude00"}', "application/json") == {
        "memo": "\U0001f600"
    }


@pytest.mark.parametrize("raw", [b'{"amount": NaN}', b'{"amount": Infinity}', b'{"a": -Infinity}',
                                 b'{"amount": 1e400}'])  # fmt: skip
def test_a_json_body_with_a_non_finite_number_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not a JSON number"):
        parse_json_body(raw, "application/json")


@pytest.mark.parametrize(
    ("upstream", "spiffe_id", "message"),
    [
        ("http://10.0.0.5", "spiffe://aegis.local/tenant/acme/env/prod/agent/ledger", "https"),
        ("https://10.0.0.5", "https://ledger.example", "spiffe"),
        ("https://10.0.0.5", "spiffe://aegis.local/a/../b", "spiffe"),
    ],
)
def test_a_pinned_upstream_needs_https_and_a_valid_spiffe_id(
    upstream: str, spiffe_id: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayRoute(path_prefix="/l", upstream=upstream, tool="t", tenant="a", env="p",
                     upstream_spiffe_id=spiffe_id)  # fmt: skip


def test_a_pinned_upstream_without_the_gateways_certificate_is_refused_at_start() -> None:
    settings = GatewaySettings.model_validate(
        {"routes": [{"path_prefix": "/l", "upstream": "https://10.0.0.5", "tool": "t",
                     "tenant": "a", "env": "p",
                     "upstream_spiffe_id": "spiffe://aegis.local/tenant/a/env/p/agent/ledger"}]}
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"pki\.gateway_agent"):
        ReverseProxy(None, settings)  # type: ignore[arg-type]


def test_fields_named_in_connection_are_left_out_and_single_fields_stay_single() -> None:
    headers = (("host", "gw"), ("connection", "X-Dry-Run, keep-alive"), ("x-dry-run", "1"),
               ("accept", "a"), ("accept", "b"))  # fmt: skip
    kept, values = vet_fields(headers)
    assert kept == (("host", "gw"), ("connection", "X-Dry-Run, keep-alive"), ("accept", "a"),
                    ("accept", "b"))  # fmt: skip
    assert values == {"host": "gw", "connection": "X-Dry-Run, keep-alive", "accept": "a"}
    for bad in ((("content-type", "a/json"), ("content-type", "text/plain")),
                (("host", "a"), ("host", "b")),
                (("content-encoding", "gzip"), ("connection", "close, Content-Encoding")),
                (("connection", "transfer-encoding"),)):  # fmt: skip
        with pytest.raises(InvalidRequest):
            vet_fields(bad)


@pytest.mark.parametrize(
    "raw",
    [b'{"amount": 1, "AMOUNT": 5000}', b'{"k": 1, "\\u212a": 2}', b'{"a": {"Dist": 1, "dist": 2}}',
     b'{"amount": 1, "AMOUNT": 2}', b'{"recipient": "ok", "rec\\u0131pient": "mallory"}'],
)  # fmt: skip
def test_json_members_that_differ_only_in_case_are_refused(raw: bytes) -> None:
    """Go's encoding/json matches member names without regard to case (the last wins), the
    dotless i as I: policy would read amount 1 and the tool 5000."""
    with pytest.raises(InvalidRequest, match="differ only in case"):
        parse_json_body(raw, "application/json")


@pytest.mark.parametrize(
    "fields",
    [
        (("content-type", "application/x-www-form-urlencoded, application/vnd.api+json"),),
        (("content-type", "application/x-www-form-urlencoded application/vnd.api+json"),),
        (("content-type", "text/plain;a=1,application/json"),),
        (("transfer-encoding", "gzip, chunked"),),
        (("content_type", "application/json"),),
        (("Content_Encoding".lower(), "gzip"),),
    ],
)
def test_fields_an_upstream_could_read_another_way_are_refused(
    fields: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(InvalidRequest):
        vet_fields(fields)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        # RFC 9112 §6.3: one server frames the body by the length, another by the chunks.
        ((("content-length", "5"), ("transfer-encoding", "chunked")), "not both"),
        ((("transfer-encoding", "chunked"), ("content-length", "0")), "not both"),
        # Control characters (h11 accepts \x01); a CR or LF is what a kept obs-fold leaves.
        ((("x-note", "a\x01b"),), "control character"),
        ((("x-note", "a\x00b"),), "control character"),
        ((("x-note", "a\x7f"),), "control character"),
        ((("x-note", "a\r\n b"),), "control character"),
        ((("x-account", "1\n666"),), "control character"),
        # Read as Latin-1 here, re-encoded as UTF-8 on the way: the upstream reads other bytes.
        ((("x-note", "caf\xc3\xa9"),), "outside ASCII"),
        ((("x-account", "\xa0666"),), "outside ASCII"),
        ((("x-note", "\u2028"),), "outside ASCII"),
    ],
)
def test_ambiguous_framing_and_unsafe_field_values_are_refused(
    fields: tuple[tuple[str, str], ...], why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why):
        vet_fields((("host", "gw"), *fields))


def test_printable_ascii_and_tabs_pass() -> None:
    fields = (("x-note", "a\tb ~!"), ("content-length", "3"), ("te", "trailers"))
    assert vet_fields(fields)[0] == fields
    assert vet_fields((("transfer-encoding", "chunked"),))[1] == {"transfer-encoding": "chunked"}


@pytest.mark.parametrize(
    "ctype",
    ["application/json", "application/json; charset=utf-8", 'multipart/form-data; boundary="a,b"',
     "Application/JSON "],
)  # fmt: skip
def test_one_media_type_with_parameters_passes(ctype: str) -> None:
    assert vet_fields((("content-type", ctype), ("transfer-encoding", "chunked")))[1] == {
        "content-type": ctype, "transfer-encoding": "chunked"
    }  # fmt: skip


#: Policy reads amount 1; as UTF-7 the same bytes say '"memo": "", "amount": 5000, "x": ""'.
UTF7_TRICK = b'{"amount": 1, "memo": "+ACI-, +ACI-amount+ACI-: 5000, +ACI-x+ACI-: +ACI-"}'


@pytest.mark.parametrize(
    "ctype",
    ["application/json; charset=utf-7", 'application/json;charset="UTF-16"',
     "application/json; charset=utf-8; charset=utf-7", "application/json; charset=hz",
     "application/json; charset*=utf-7", "application/json; charset*=utf-8''utf-7",
     "application/json; charset=utf-8; charset*=utf-8", 'application/json; a="x,charset=utf-7"'],
)  # fmt: skip
def test_a_json_body_labelled_with_another_charset_is_refused(ctype: str) -> None:
    """body-parser and Django (which reads RFC 2231 charset*=) decode by the label, and Rack
    finds one inside a quoted value: as UTF-7, '+ACI-' is a quote."""
    assert json.loads(UTF7_TRICK.decode("utf-7"))["amount"] == 5000
    with pytest.raises(InvalidRequest, match="UTF-8"):
        parse_json_body(UTF7_TRICK, ctype)
    assert parse_json_body(b'{"a": 1}', "application/json; charset=UTF-8") == {"a": 1}
    for label in ("us-ascii", "ASCII", '"US-ASCII"'):  # UTF-8's subset, when the body is ASCII
        assert parse_json_body(b'{"a": 1}', f"application/json; charset={label}") == {"a": 1}
        with pytest.raises(InvalidRequest):
            parse_json_body('{"a": "\u00e9"}'.encode(), f"application/json; charset={label}")


def test_an_answer_may_hold_members_that_differ_in_case() -> None:
    """Only requests are held to it: a sanitized answer is the upstream's own JSON."""
    body = b'{"id": "a1", "ID": 7}'
    assert parse_json_body(body, "application/json", fold_case=False) == {"id": "a1", "ID": 7}


def test_an_empty_content_type_is_no_type_and_an_unclosed_quote_is_refused_quickly() -> None:
    assert vet_fields((("content-type", ""),))[1] == {"content-type": ""}
    assert vet_fields((("content-type", "  "),))[1] == {"content-type": "  "}
    # An unclosed quote of escapes: quadratic for a backtracking pattern (seconds at 60 KB);
    # the pattern is possessive, and longer values are refused before it runs.
    with pytest.raises(InvalidRequest):
        vet_fields((("content-type", "application/json;a=" + '"\\' * 500),))
    with pytest.raises(InvalidRequest):
        vet_fields((("content-type", "application/json;a=" + "b" * 2000),))  # over 1,024


def test_too_many_or_too_large_header_fields_are_refused_before_anything_is_read() -> None:
    from aegis.gateway.fields import MAX_FIELD_BYTES, MAX_FIELDS

    many = tuple((f"x-{i}", "v") for i in range(MAX_FIELDS + 1))
    with pytest.raises(InvalidRequest, match="header fields"):
        vet_fields(many)
    with pytest.raises(InvalidRequest, match="header fields"):
        vet_fields((("x-big", "v" * MAX_FIELD_BYTES),))
    assert vet_fields(tuple((f"x-{i}", "v") for i in range(MAX_FIELDS)))[1]["x-0"] == "v"


#: One path, two routes: admin.example.com's, and the host-less one every other host gets.
HOST_ROUTES: Any = [
    {"path_prefix": "/payments", "host": "admin.example.com", "upstream": "http://127.0.0.1:9",
     "tool": "admin-payments", "tenant": "acme", "env": "prod"},
    {"path_prefix": "/payments", "upstream": "http://127.0.0.1:9", "tool": "payments",
     "tenant": "acme", "env": "prod"},
]  # fmt: skip


async def _proxied(env: Env, headers: dict[str, str]) -> httpx.Response:
    data = env.settings.model_dump()
    data["routes"] = HOST_ROUTES
    proxy = ReverseProxy(env.pipeline, GatewaySettings.model_validate(data))
    await proxy.start()
    try:
        transport = httpx.ASGITransport(app=proxy, client=("198.51.100.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="https://gw.example.com") as c:
            agent = Agent(env)
            return await c.post(
                "/payments/charge", headers={**dict(dpop_headers(agent, agent.token())), **headers}
            )
    finally:
        await proxy.close()


def _refused_record(env: Env, resp: httpx.Response) -> dict[str, Any]:
    assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), resp.text
    [record] = [r for r in env.audit.records(kind="gateway.refused")
                if r["decision_id"] == resp.json()["decision_id"]]  # fmt: skip
    assert (record["door"], record["status"], record["code"]) == ("proxy", 400, "invalid_request")
    return record


@pytest.mark.parametrize(
    "host",
    [
        # Each would choose the host-less route here, while the upstream, told this host in
        # X-Forwarded-Host, reads admin.example.com (Express drops a port and keeps a list's
        # first member).
        "admin.example.com:x",
        "admin.example.com,x",
        "admin.example.com:99999",
        "gw.example.com/payments/charge#",
        "",
    ],
)
async def test_a_host_that_is_not_one_authority_is_refused_before_any_route(
    env: Env, host: str
) -> None:
    _refused_record(env, await _proxied(env, {"host": host}))
    assert not list(env.audit.records(kind="gateway.decision"))  # no route, so no decision


@pytest.mark.parametrize(
    "fields",
    [{"upgrade": "websocket", "connection": "Upgrade"}, {"upgrade": "h2c"}],
)
async def test_a_protocol_upgrade_is_refused_and_audited(env: Env, fields: dict[str, str]) -> None:
    resp = await _proxied(env, fields)
    assert "Upgrade" in resp.json()["message"]
    _refused_record(env, resp)


async def test_a_websocket_handshake_gets_the_refusal_as_an_http_answer(env: Env) -> None:
    """Where the server offers the WebSocket Denial Response extension, the handshake is
    answered with the same status and JSON as any refusal; elsewhere it is closed unaccepted."""
    proxy = ReverseProxy(env.pipeline, GatewaySettings.model_validate(env.settings.model_dump()))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope: dict[str, Any] = {
        "type": "websocket", "path": "/payments/charge", "raw_path": b"/payments/charge",
        "query_string": b"", "scheme": "wss", "client": ("198.51.100.7", 5555),
        "headers": [(b"host", b"gw.example.com"), (b"upgrade", b"websocket")],
        "extensions": {"websocket.http.response": {}},
    }  # fmt: skip
    await proxy(scope, receive, send)
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 400
    answer = json.loads(sent[1]["body"])
    assert answer["code"] == "invalid_request" and "Upgrade" in answer["message"]
    sent.clear()
    del scope["extensions"]
    await proxy(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]
    refused = list(env.audit.records(kind="gateway.refused"))
    assert [(r["door"], r["code"]) for r in refused] == [("proxy", "invalid_request")] * 2


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "not both"),
        (b"X-Note: a\x01b\r\n", "control character"),
        (b"X-Note: caf\xc3\xa9\r\n", "outside ASCII"),
    ],
)
async def test_the_mtls_listener_refuses_ambiguous_framing_and_unsafe_values(
    env: Env, tmp_path: Path, fields: bytes, why: str
) -> None:
    """h11, which parses requests on the mTLS listener, accepts each; the refusal is audited and
    ends the connection, so nothing sent after the request is read as another one."""
    ca, cert, key = make_ca(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca))
    data = env.settings.model_dump()
    data["routes"] = HOST_ROUTES
    proxy = ReverseProxy(env.pipeline, GatewaySettings.model_validate(data))
    await proxy.start()
    listener = MTLSListener(proxy, context=lambda: server)
    await listener.start()

    async def exchange(head: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, ssl=client, server_hostname="localhost"
        )
        try:
            body = b"0\r\n\r\n" if b"chunked" in head else b""
            framing = b"" if body else b"Content-Length: 0\r\n"
            writer.write(
                b"POST /payments/charge HTTP/1.1\r\nHost: gw.example.com\r\n" + head + framing
                + b"\r\n" + body + b"GET /payments/x HTTP/1.1\r\nHost: gw.example.com\r\n\r\n"
            )  # fmt: skip
            await writer.drain()
            answer = b""
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                answer += chunk
                if not head and answer.count(b"HTTP/1.1 ") == 2:
                    break  # kept open for the next request
            return answer
        finally:
            await close_writer(writer)

    try:
        answer = await exchange(fields)
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # the second request was never read
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
        refusal = json.loads(payload)
        assert refusal["code"] == "invalid_request" and why in refusal["message"]
        [record] = [r for r in env.audit.records() if r["decision_id"] == refusal["decision_id"]]
        assert (record["action"], record["code"]) == ("deny", "invalid_request")
        # The same call with clean fields reaches the credentials check, on a connection kept.
        clean = await exchange(b"")
        assert clean.count(b"HTTP/1.1 401 ") == 2, clean
    finally:
        await listener.stop()
        await proxy.close()


@pytest.mark.parametrize(
    ("name", "key"),
    [("transfer[max[amount", "transfer_max_amount"), ("account[id", "account_id"),
     ("cmd[action]", "action"), ("!action", "action"), ("cmd.action", "action")],
)  # fmt: skip
def test_a_name_is_filed_under_each_key_a_lenient_parser_reads(name: str, key: str) -> None:
    """PHP turns an unclosed ``[`` and every ``[`` after it into ``_``; ASP.NET Core reads
    ``cmd[action]`` and ``cmd.action`` as ``action``; Spring binds ``!action`` as ``action``."""
    assert key in name_keys(name)


@pytest.mark.parametrize(
    ("path", "refused"),
    [("/openapi.json", True), ("/openapi/", False), ("/openapi/x.json", False),
     ("/api/v1.2", True), ("/api/v1.2/items", False)],
)  # fmt: skip
def test_a_variant_is_routed_as_it_would_be_sent(path: str, refused: bool) -> None:
    """Rails serves /openapi.json through its /openapi action: with routes for both, the call
    decided under /openapi.json would be served by /openapi's tool."""
    table = _table(("/", "public", None), ("/openapi", "admin", None),
                   ("/openapi.json", "spec", None), ("/api/v1", "v1", None),
                   ("/api/v1.2", "v12", None))  # fmt: skip
    route = table.match("gw", vet_path(path))
    assert route is not None
    assert (table.read_as_another("gw", vet_path(path), route) is not None) is refused


@pytest.mark.parametrize("prefix", ["/api/v1.2.3", "/files/report.tar.gz"])
def test_a_route_prefix_with_several_dots_serves_its_own_path(prefix: str) -> None:
    """Each reading of such a path (``/api/v1.2``, ``/api/v1``) falls under the route's own
    readings, not under the catch-all."""
    table = _table(("/", "public", None), (prefix, "tool", None))
    route = table.match("gw", vet_path(prefix))
    assert route is not None and route.tool == "tool"
    assert table.read_as_another("gw", vet_path(prefix), route) is None
    inner = vet_path(prefix + "/x.json")
    assert table.read_as_another("gw", inner, route) is None
