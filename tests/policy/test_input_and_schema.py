"""The one input document, and the published JSON Schema."""

from __future__ import annotations

import json
import re
import unicodedata

import pytest

from aegis.errors import InvalidRequest
from aegis.policy.input import (
    AgentInfo,
    ChainInfo,
    PolicyCall,
    build_input,
    call_from_dict,
    fold_case,
    loose_path,
    path_variants,
)
from aegis.policy.schema import schema_text
from tests.policy.conftest import REPO


def test_input_document_shape() -> None:
    call = PolicyCall(
        tool="t",
        agent=AgentInfo(id="a", roles=("r",), attributes={"k": 1}, version="1", owner="o"),
        tenant="acme",
        env="prod",
        time=1700000000.9,
        method="get",
        scopes=("s",),
        chain=ChainInfo(
            agents=("orchestrator", "planner"), origin_user="alice", origin_iss="https://idp"
        ),
        body={"x": 1},
        query={"q": ["1", "2"]},
        headers={"X-Trace": "1", "Authorization": "Bearer secret", "Cookie": "c", "DPoP": "p"},
    )
    doc = build_input(call)
    assert set(doc) == {
        "tool",
        "resource",
        "method",
        "path",
        "path_loose",
        "tenant",
        "env",
        "agent",
        "token",
        "auth",
        "chain",
        "request",
        "time",
    }
    assert doc["method"] == "GET"
    assert doc["chain"] == {
        "agents": ["orchestrator", "planner"],
        "parent": "planner",
        "depth": 2,
        "origin_user": "alice",
        "origin_iss": "https://idp",
    }
    assert doc["request"]["headers"] == {"x-trace": "1"}  # credentials never reach policy
    assert doc["time"] == {"unix": 1700000000}
    assert doc["request"]["query"] == {"q": ["1", "2"]}
    json.dumps(doc)  # always plain JSON


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "'tool' is required"),
        ({"tool": "t", "tols": 1}, "unknown call field"),
        ({"tool": "t", "scopes": "a"}, "list of strings"),
        ({"tool": "t", "auth_method": "basic"}, "auth_method"),
        ({"tool": "t", "time": "now"}, "unix seconds"),
        ({"tool": "t", "agent": []}, "must be an object"),
    ],
)
def test_call_json_is_checked(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        call_from_dict(data)


def test_published_schema_is_current() -> None:
    published = (REPO / "docs" / "policy-schema.json").read_text()
    assert published == schema_text(), (
        "regenerate: python -m aegis.policy.schema > docs/policy-schema.json"
    )
    schema = json.loads(published)
    assert schema["properties"]["apiVersion"]["const"] == "aegis/v1"


@pytest.mark.parametrize(
    ("path", "loose"),
    [("/payments/charge", "/payments/charge"), ("/Payments/ADMIN", "/payments/admin"),
     ("/payments;v=1/admin./x ", "/payments/admin/x"),
     ("/\uff41\uff44\uff4d\uff49\uff4e/users", "/admin/users"),
     ("/payments/refund/", "/payments/refund/"), ("/Payments/Refund.JSON", "/payments/refund.json"),
     ("/adm\u0131n", "/admin"), ("/stra\u00dfe", "/stra\u00dfe"), ("/", "/"),
     ("/ admin/ x", "/admin/x"), ("/\u03bc\u03cc\u03c2", "/\u03bc\u03cc\u03c3"),
     ("/\u0430\u1c81\u043c", "/\u0430\u0434\u043c"), ("/\u0345\u03b4", "/\u03b9\u03b4")],
)  # fmt: skip
def test_policy_sees_the_path_as_the_loosest_upstream_reads_it(path: str, loose: str) -> None:
    """A rule on ``path_loose`` holds for every spelling an upstream serves as that path; the
    route was chosen on the same reading. ASP.NET Core compares by each character's simple upper
    case (the final sigma is the sigma, U+1C81 the Cyrillic de, U+0345 the iota); Spring's path
    matcher trimmed leading spaces off each segment."""
    doc = build_input(PolicyCall(tool="t", agent=AgentInfo(id="a"), tenant="acme", env="prod",
                                 time=0.0, path=path))  # fmt: skip
    assert (doc["path"], doc["path_loose"]) == (path, loose)


@pytest.mark.parametrize(
    ("loose", "variants"),
    [("/payments/refund/", ("/payments/refund",)), ("/payments/refund.json", ("/payments/refund",)),
     ("/files/report.tar.gz", ("/files/report", "/files/report.tar")),
     ("/setup.exe/", ("/setup.exe", "/setup")), ("/payments/refund", ()), ("/.well-known", ()),
     ("/", ()), ("/v1.2/pay", ()), ("/admin.php/x", ("/admin.php",)),
     ("/Svc.asmx/Get".lower(), ("/svc.asmx",)), ("/a/x.cgi/y.aspx/z/", ("/a/x.cgi/y.aspx/z",
     "/a/x.cgi", "/a/x.cgi/y.aspx")), ("/users/john.doe/x", ())],
)  # fmt: skip
def test_the_variant_readings_drop_a_trailing_slash_and_each_format(
    loose: str, variants: tuple[str, ...]
) -> None:
    """Rails serves ``/refund.json`` and Express ``/refund/`` and ``/setup.exe/`` as ``/refund``
    and ``/setup.exe``; Spring's suffix match served ``/admin.x.y`` as ``/admin``."""
    assert path_variants(loose) == variants


def test_a_path_naming_many_scripts_is_refused() -> None:
    """Each script segment (PHP's PATH_INFO) is a reading the call is decided under."""
    assert len(path_variants("/a.php" * 4 + "/x")) == 4
    with pytest.raises(InvalidRequest, match="more than 4 scripts"):
        path_variants("/a.php" * 5 + "/x")


def test_every_path_folds_to_a_fixed_point() -> None:
    """The loose reading of a loose reading is itself, for every character: a literal written
    in the loose form matches, and a route prefix compares the same as a path."""
    for code in range(0x20, 0x30000):
        if 0xD800 <= code <= 0xDFFF or chr(code) in "/;":
            continue
        loose = loose_path(f"/a{chr(code)}b")
        assert loose_path(loose) == loose, hex(code)


def test_a_last_segment_of_many_dots_is_refused() -> None:
    """Each dot is a reading the call is decided under: their number is bounded."""
    assert len(path_variants("/f/" + "a." * 8 + "z")) == 8
    with pytest.raises(InvalidRequest, match="more than 8 dots"):
        path_variants("/f/" + "a." * 9 + "z")


def _load_rule(path: str, test: str) -> None:
    from aegis.policy.loader import load_document

    load_document("apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec: {rules: "
                  f"[{{id: r, action: deny, when: {{path: {path}, {test}}}}}]}}\n")  # fmt: skip


@pytest.mark.parametrize(
    ("path", "literal", "fixed"),
    [("path_loose", "/Payments/refund", "/payments/refund"), ("path_loose", "/admin;x", "/admin"),
     ("method", "get", "GET"), ("request.headers.host", "Admin.Example.com", "admin.example.com"),
     ("request.headers.host", "admin.example.com:443", "admin.example.com"),
     ("request.headers.x-forwarded-host", "admin.example.com.", "admin.example.com"),
     ("path_loose", "/payments/refund/", "/payments/refund"), ("method", "DELETE ", "DELETE"),
     ("path_loose", "/\u03bb\u03cc\u03b3\u03bf\u03c2", "/\u03bb\u03cc\u03b3\u03bf\u03c3"),
     ("request.headers.host", "admin.example.com..", "admin.example.com"),
     ("request.headers.host", "b\u00fccher.example", "xn--bcher-kva.example")],
)  # fmt: skip
def test_a_literal_the_input_never_holds_is_refused_at_load(
    path: str, literal: str, fixed: str
) -> None:
    """``deny when method eq get`` would never match, and so never deny."""
    from aegis.errors import PolicyError

    for test in (f"eq: '{literal}'", f"in: ['{literal}']", f"not_in: ['{literal}']"):
        with pytest.raises(PolicyError, match=f"never holds .*write '{re.escape(fixed)}'"):
            _load_rule(path, test)
        _load_rule(path, test.replace(literal, fixed))


@pytest.mark.parametrize("test", ["regex: '^GET$'", "contains: GET"])
def test_a_pattern_on_the_method_is_refused_at_load(test: str) -> None:
    """A pattern naming GET would not name HEAD, which servers answer with the GET handler."""
    from aegis.errors import PolicyError

    with pytest.raises(PolicyError, match="methods selector"):
        _load_rule("method", test)


@pytest.mark.parametrize("literal", ["/a/./b", "/a//b", "/a/../b"])
def test_a_path_literal_with_empty_or_dot_segments_is_refused_at_load(literal: str) -> None:
    """Such a path is refused before policy reads it, so a deny on it would never fire."""
    from aegis.errors import PolicyError

    with pytest.raises(PolicyError, match=r"empty, '\.' or '\.\.' segments"):
        _load_rule("path_loose", f"eq: '{literal}'")


def test_a_non_ascii_host_pattern_is_refused_at_load() -> None:
    """The gateway admits only an ASCII Host: an internationalised name arrives as xn--."""
    from aegis.errors import PolicyError

    with pytest.raises(PolicyError, match="ASCII"):
        _load_rule("request.headers.host", "contains: b\u00fccher")


@pytest.mark.parametrize(
    ("path", "test"),
    [("path_loose", "regex: '^/Admin'"), ("path_loose", "contains: Admin"),
     ("path_loose", "contains: '/admin;'"), ("request.headers.host", "contains: ADMIN"),
     ("request.headers.host", "regex: ':443$'"),
     ("path_loose", "regex: '^/payments/refund/$'"), ("path_loose", "contains: adm\u0131n"),
     ("path_loose", "contains: \uff52\uff45\uff46\uff55\uff4e\uff44"),
     ("path_loose", "regex: '^/\u0391\u0394'"), ("path_loose", "contains: /\u03c2")],
)  # fmt: skip
def test_a_pattern_the_input_never_holds_is_refused_at_load(path: str, test: str) -> None:
    from aegis.errors import PolicyError

    with pytest.raises(PolicyError, match="never holds what"):
        _load_rule(path, test)
    fixed = test.replace("A", "a").replace("DMIN", "dmin").replace(";", "").replace(":443", "x")
    fixed = unicodedata.normalize("NFKC", fixed).replace("\u0131", "i").replace("/$", "$")
    _load_rule(path, fold_case(fixed) if "\u03c2" in fixed or "\u0391" in fixed else fixed)


def test_a_method_selector_with_spaces_is_refused_at_load() -> None:
    """``methods: ["POST "]`` would never match a call, so a deny on it would never fire."""
    from aegis.errors import PolicyError
    from aegis.policy.loader import load_document

    text = ("apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec: {rules: "
            "[{id: r, action: deny, match: {methods: ['POST ']}}]}\n")  # fmt: skip
    with pytest.raises(PolicyError, match="holds spaces"):
        load_document(text)
    load_document(text.replace("'POST '", "post"))


@pytest.mark.parametrize(
    ("path", "test"),
    [("request.headers.cookie", "contains: admin"), ("request.headers.authorization", "exists: true"),
     ("request.body.to", "eq: 9007199254740993"), ("request.body.n", "gt: -9007199254740993")],
)  # fmt: skip
def test_a_condition_policy_input_never_holds_is_refused_at_load(path: str, test: str) -> None:
    """Credential headers are removed from the input, and a body integer beyond 2**53 is refused
    before policy reads it: a rule on either would never match."""
    from aegis.errors import PolicyError

    with pytest.raises(PolicyError):
        _load_rule(path, test)
