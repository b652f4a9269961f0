"""A POST whose body carries ``_method`` (Rails' Rack::MethodOverride, Laravel, Symfony, Express's
method-override reading ``req.body``) is served as another method than the one decided on: such a
body is refused however the field is spelled or encoded, whole or as it streams."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis.errors import InvalidRequest
from aegis.gateway.overrides import MethodOverrideWatch, refuse_method_override

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MULTIPART = "multipart/form-data; boundary=XyZ"


def _part(disposition: bytes, value: bytes = b"DELETE") -> bytes:
    return b"--XyZ\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"


def _multipart(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--XyZ--\r\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"amount=5&_method=DELETE"),
        (FORM, b"%5Fmethod=DELETE"),
        (FORM, b"_%6Dethod=DELETE"),
        (FORM, b"_METHOD=delete"),
        (FORM, b"_method[]=DELETE"),
        (f"{FORM}; charset=utf-8", b"x=1&_method=PUT"),
        (JSON, b'{"amount": 5, "_method": "DELETE"}'),
        (JSON, b'{"\\u005fmethod": "DELETE"}'),
        ("application/vnd.api+json", b'{"_Method": "DELETE"}'),
        (MULTIPART, _multipart(_part(b'form-data; name="_method"'))),
        (MULTIPART, _multipart(_part(b'form-data; name="file"; filename="a"', b"x" * 100),
                               _part(b"form-data; name=_method"))),
        (MULTIPART, _multipart(_part(b"form-data; name*=UTF-8''%5Fmethod"))),
        ("multipart/form-data", _multipart(_part(b'form-data; name="a"'))),  # no boundary
        # Where parsers part ways: a closing delimiter first (Rack and PHP read on), a part after
        # the closing delimiter (PHP reads it), two boundary parameters (Rack takes the last, PHP
        # the first), an unnamed part (Rack names it by Content-ID), names as PHP or Rack clean
        # them (quotes, backslashes, leading spaces, NUL).
        (MULTIPART, b"--XyZ--\r\n" + _multipart(_part(b'form-data; name="_method"'))),
        (MULTIPART, _multipart(_part(b'form-data; name="a"')) + _part(b'form-data; name="_method"')),
        ("multipart/form-data; boundary=XyZ; xboundary=C", _multipart(_part(b'form-data; name="a"'))),
        (MULTIPART, _multipart(b"--XyZ\r\nContent-ID: _method\r\n\r\nDELETE\r\n")),
        (MULTIPART, _multipart(_part(b'form-data; name="_meth\\od"'))),
        (MULTIPART, _multipart(_part(b"form-data; name='_method'"))),
        (MULTIPART, _multipart(_part(b'form-data; name=" _method"'))),
        (MULTIPART, _multipart(_part(b'form-data; name="_method\x00x"'))),
        (MULTIPART, _multipart(_part(b"form-data; name*0=_method"))),
        # A POST without a type is a form to Rack; any type holding /json is JSON to Laravel.
        ("", b"_method=DELETE"),
        (None, b"x=1&_method=DELETE"),
        ("text/plain; x=/json", b'{"_method": "DELETE"}'),
        ("application/jsonp", b'{"_method": "DELETE"}'),
        # Read as other readers read it: in the charset the type names, split on ';' too.
        ("multipart/related; boundary=XyZ",
         _multipart(b"--XyZ\r\nContent-ID: <_method>\r\n\r\nDELETE\r\n")),
        (FORM, b"a=1;_method=DELETE"),
        # Read as PHP and JavaScript read JSON: repeats, NaN and numbers out of range included.
        (JSON, b'{"_method": "DELETE", "a": 1, "a": 2, "n": 1e400}'),
        ("text/json", b'\xef\xbb\xbf{"_method": "DELETE"}'),
        # Any multipart type is a form to Rack; a boundary Rack would cut at ','.
        ("multipart/mixed; boundary=XyZ", _multipart(_part(b'form-data; name="_method"'))),
        ('multipart/form-data; boundary="a,b"', b"--a,b\r\n"),
        (MULTIPART, _multipart(_part(b'form-data; name="a"; x="b name=_method"'))),
        # Charsets the gateway does not read names in (iconv-lite reads UTF-7 and UTF-16), or
        # no text encoding at all: refused, never a crash.
        (f"{JSON}; charset=utf-7", b'{"+AF8-method": "DELETE"}'),
        (f"{JSON}; charset=utf-16", b'\x00{\x00"\x00a\x00"\x00:\x001\x00}'),
        (f"{FORM}; charset=punycode", b"x-" + b"a" * 1000),
        (f"{FORM}; charset=idna", b"a=1"),
        (f"{FORM}; charset=undefined", b"a=1"),
        # Rack 2 and qs read [_method] as _method; older Rack found names in look-alike headers.
        (FORM, b"[_method]=DELETE"),
        (FORM, b"%5B_method%5D=DELETE"),
        (FORM, b"]_method=DELETE"),
        (MULTIPART, _multipart(_part(b'form-data; name="[_method]"'))),
        (MULTIPART, _multipart(b'--XyZ\r\nX-Content-Disposition: form-data; name="_method"\r\n'
                               b'Content-Disposition: form-data; name="note"\r\n\r\nx\r\n')),
        ("multipart/related; boundary=XyZ",
         _multipart(b"--XyZ\r\nX-Content-ID: _method\r\n\r\nDELETE\r\n")),
        (MULTIPART, _multipart(b"--XyZ\r\nX-Note: Content-Disposition: form-data; name=_method\r\n"
                               b'Content-Disposition: form-data; name="foo"\r\n\r\nPUT\r\n')),
        ("multipart/mixed; boundary=XyZ",
         _multipart(b"--XyZ\r\nX-Note: Content-ID: _method\r\n\r\nPUT\r\n")),
        # A form to Express and Rack, JSON to Laravel: read both ways.
        (f'{FORM}; x="/json"', b"_method=DELETE"),
        (f"{FORM}; profile=a/json", b"_method=DELETE"),
        # PHP drops leading spaces from names and ends them at a NUL.
        (FORM, b"+_method=DELETE"),
        (FORM, b"_method%00x=DELETE"),
    ],
)  # fmt: skip
def test_a_post_body_carrying_a_method_override_is_refused(
    content_type: str | None, body: bytes
) -> None:
    with pytest.raises(InvalidRequest):
        refuse_method_override("POST", content_type, body)


@pytest.mark.parametrize(
    ("method", "content_type", "body"),
    [
        ("POST", FORM, b"amount=5&method=card&note=_method"),
        ("POST", JSON, b'{"payment": {"_method": "DELETE"}, "method": "card"}'),  # not top level
        ("POST", "text/plain", b"_method=DELETE"),
        ("PUT", FORM, b"_method=DELETE"),  # frameworks override only a POST
        ("POST", MULTIPART, _multipart(_part(b'form-data; name="method"'),
                                       _part(b'form-data; name="f"; filename="_method"'))),
        ("POST", MULTIPART, _multipart(_part(b'form-data; name="f"; filename="get_method.py"'))),
        # Bodies no reader finds a field in, or none named _method, whatever their bytes.
        ("POST", JSON, b"not json _method"),
        ("POST", None, json.dumps({"sql": "SELECT 1; SELECT method"}).encode()),
        ("POST", None, b"\x89PNG\r\n\x1a\n\xff\xfe_meth"),
        ("POST", f"{FORM}; charset=ISO-8859-1", b"name=Ren%E9&amount=5"),
        ("POST", FORM, b"payee[account]=1&items[]=2"),
        ("POST", "application/jsonl", b'{"a": 1}\n{"_method": "x"}\n'),
        ("POST", JSON, b'{"n": ' + b"9" * 5000 + b"}"),
        # multipart/related parts carry no name (an upload's metadata and media).
        ("POST", "multipart/related; boundary=XyZ",
         _multipart(b"--XyZ\r\nContent-Type: application/json\r\n\r\n{}\r\n",
                    b"--XyZ\r\nContent-Type: image/png\r\n\r\nPNG\r\n")),
        ("POST", MULTIPART, _multipart(_part(b'form-data; name="a"')) + b"\r\n"),
    ],
)  # fmt: skip
def test_bodies_without_an_override_pass(
    method: str, content_type: str | None, body: bytes
) -> None:
    refuse_method_override(method, content_type, body)


def test_a_content_coded_body_that_may_hide_an_override_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="content-encoding"):
        refuse_method_override("POST", FORM, b"\x1f\x8b...", "gzip")
    refuse_method_override("POST", FORM, b"a=1", "identity")
    refuse_method_override("POST", "application/octet-stream", b"\x1f\x8b", "gzip")


@given(split=st.integers(1, 200), size=st.integers(0, 3000))
def test_the_streaming_watch_stops_before_the_chunk_naming_the_field(split: int, size: int) -> None:
    """However the body is cut into chunks, the chunk completing the ``_method`` part header
    raises before it is passed on: the bytes passed on never hold the whole header."""
    head = _part(b'form-data; name="file"; filename="a"', b"_method " * (size // 8))
    body = _multipart(head, _part(b'form-data; name="_method"'))
    watch = MethodOverrideWatch(MULTIPART)
    passed: list[bytes] = []

    def stream() -> None:
        for i in range(0, len(body), split):
            watch.feed(body[i : i + split])
            passed.append(body[i : i + split])

    with pytest.raises(InvalidRequest):
        stream()
    assert b'name="_method"\r\n' not in b"".join(passed)


@given(names=st.lists(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=9), max_size=6))
def test_forms_and_json_are_refused_exactly_when_a_top_level_name_is_the_override(
    names: list[str],
) -> None:
    overriding = any(n.split("[")[0].casefold() == "_method" for n in names)
    form = "&".join(f"{n}=v" for n in names).encode()
    doc = json.dumps(dict.fromkeys(names, 1)).encode()
    for content_type, body in ((FORM, form), (JSON, doc)):
        try:
            refuse_method_override("POST", content_type, body)
        except InvalidRequest:
            assert overriding, (content_type, body)
        else:
            assert not overriding, (content_type, body)


def test_a_body_in_a_charset_with_a_quadratic_decoder_costs_nothing() -> None:
    """punycode's decoder is quadratic: a labelled body is refused before any decoding."""
    import time

    started = time.perf_counter()
    with pytest.raises(InvalidRequest):
        refuse_method_override("POST", f"{FORM}; charset=punycode", b"x-" + b"a" * 1_000_000)
    assert time.perf_counter() - started < 1.0
