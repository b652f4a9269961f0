"""Upstream answers through the reverse proxy over real sockets: what a sanitize decision lets
reach the caller (whole answers only, no validator of the unsanitized body, masks that see what
the client reads), answer framing, and header bytes as the upstream sent them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.loader import load_document
from tests.gateway.conftest import Agent, Env
from tests.gateway.harness import RawUpstream, exchange, gateway_here, raw_answer, signed_call

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: answers}
spec:
  rules:
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
    - id: crm
      action: sanitize
      reason: no ssn or card number leaves the crm
      match: {tools: [crm]}
      obligations:
        - {kind: redact, target: response, path: customer.ssn}
        - {kind: mask, target: response, pattern: card_number}
        - {kind: mask, target: response, pattern: email}
    - id: notes
      action: sanitize
      reason: notes leave masked
      match: {tools: [notes]}
      obligations:
        - {kind: mask, target: response, pattern: card_number}
        - {kind: mask, target: response, pattern: email}
        - {kind: mask, target: response, pattern: secret}
    - id: ledger
      action: sanitize
      reason: no card number or address reaches the ledger
      match: {tools: [ledger]}
      obligations:
        - {kind: mask, target: request, pattern: card_number}
        - {kind: mask, target: request, pattern: email}
"""
SSN, CARD = "123-45-6789", "4111111111111111"
CUSTOMER = json.dumps({"customer": {"name": "ann", "ssn": SSN}, "card": CARD}).encode()


@dataclass
class Gateway:
    port: int
    upstream: RawUpstream
    agent: Agent

    def request(self, method: str, path: str, fields: list[tuple[str, str]] | None = None,
                body: bytes = b"") -> bytes:  # fmt: skip
        """A call with a fresh DPoP proof, as bytes."""
        return signed_call(self.agent, method, path, fields, body)

    async def call(
        self, method: str, path: str, fields: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[bytes, list[bytes]], bytes]:  # fmt: skip
        """One call on its own connection: status, header fields (names lowercased), body."""
        [(head, data)] = await exchange(self.port, self.request(method, path, fields, body))
        status, *lines = head.rstrip(b"\r\n").split(b"\r\n")
        fields_out: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            fields_out.setdefault(name.strip().lower(), []).append(value.strip())
        return int(status.split(b" ")[1]), fields_out, data


@pytest.fixture
async def gateway(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The gateway before a raw upstream, served by uvicorn's ``request.param`` protocol if
    given (``h11``, as the mTLS listener serves), else the default one."""
    upstream = RawUpstream()
    async with upstream.running() as url:
        data = env.settings.model_dump()
        data["routes"] = [
            {"path_prefix": f"/{tool}", "upstream": url, "tool": tool, "tenant": "acme",
             "env": "prod"}
            for tool in ("payments", "crm", "notes", "ledger")
        ]  # fmt: skip
        settings = GatewaySettings.model_validate(data)
        version = env.policies.put(load_document(POLICY), now=time.time())
        env.policies.activate("acme", "prod", version, actor="test", now=time.time())
        pipeline = build_pipeline(
            env.services, settings, policy_store=env.policies, audit=env.audit
        )
        app = create_gateway_app(env.services, settings, pipeline=pipeline)
        async with gateway_here(app, http=getattr(request, "param", "auto")) as port:
            yield Gateway(port, upstream, Agent(env, "reader"))


async def test_a_sanitized_answer_is_never_asked_for_in_part(gateway: Gateway) -> None:
    """A range of a JSON answer holds no ``customer.ssn`` to redact, and a card number split
    over two ranges is never masked: a call under response obligations reaches the upstream
    without ``Range``, ``If-Range`` (however spelled) or the older ``Request-Range``."""
    gateway.upstream.answers["/crm/c"] = raw_answer(
        CUSTOMER, "application/json", fields=b"Accept-Ranges: bytes\r\n"
    )
    asks = [("Range", "bytes=0-10"), ("If-Range", '"v1"'), ("If_Range", '"v1"'),
            ("Request-Range", "bytes=0-10")]  # fmt: skip
    status, fields, body = await gateway.call("GET", "/crm/c", asks)
    assert status == 200, body
    assert not {"range", "if-range", "if_range", "request-range"} & set(gateway.upstream.heads[-1])
    assert json.loads(body)["customer"]["ssn"] == "[REDACTED]"
    assert b"accept-ranges" not in fields  # the gateway does not serve ranges of it either
    # Without response obligations the answer is relayed as it comes: ranges are the upstream's.
    status, _, _ = await gateway.call("GET", "/payments/c", asks)
    assert status == 200
    assert gateway.upstream.heads[-1]["range"] == "bytes=0-10"


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        # The ssn alone is valid JSON (a string) with no member to redact.
        ("/crm/part", raw_answer(b'"' + SSN.encode() + b'"', "application/json",
                                 "206 Partial Content", b"Content-Range: bytes 31-43/70\r\n")),
        ("/crm/range", raw_answer(b'"' + SSN.encode() + b'"', "application/json",
                                  fields=b"Content-Range: bytes 31-43/70\r\n")),
        ("/notes/part", raw_answer(b"card 4111 1111", "text/plain", "206 Partial Content",
                                   b"Content-Range: bytes 0-13/40\r\n")),
        # Each part masked on its own, or the whole read as one text: neither is the card.
        ("/notes/parts", raw_answer(
            b"--B\r\nContent-Range: bytes 0-13/40\r\n\r\ncard 4111 1111\r\n--B\r\n"
            b"Content-Range: bytes 14-23/40\r\n\r\n 1111 1111\r\n--B--\r\n",
            "multipart/byteranges; boundary=B", "206 Partial Content")),
        ("/notes/parts200", raw_answer(b"--B\r\n\r\n4111 1111\r\n--B--\r\n",
                                       "Multipart/ByteRanges; boundary=B")),
    ],
)  # fmt: skip
async def test_a_part_of_an_answer_is_refused_not_sanitized_alone(
    gateway: Gateway, path: str, answer: bytes
) -> None:
    gateway.upstream.answers[path] = answer
    status, _, body = await gateway.call("GET", path)
    assert (status, json.loads(body)["error"]) == (502, "bad_gateway"), body
    assert b"part" in body and SSN.encode() not in body and b"1111" not in body


#: Fields an upstream computes over the body it sent: Express's ETag is a SHA-1 of it.
DIGESTS = (
    b'ETag: W/"2f-yiQmv1YThgnMBF7t7zgbXL2pTwo"\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n'
    b"Digest: sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=\r\n"
    b"Repr-Digest: sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\r\n"
    b"Content-Digest: sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\r\n"
    b"X-Amz-Checksum-Sha256: X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=\r\n"
    b"Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
    # Object stores' own names for a body's checksum.
    b"X-Bz-Content-Sha1: 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12\r\n"
    b"x-oss-hash-crc64ecma: 1234567890\r\nx-cos-hash-crc64ecma: 1234567890\r\n"
    b"x-ms-blob-content-md5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\nX_Custom_Digest: abc\r\n"
    # The unsanitized body's length, which tells how long the redacted value was.
    b"X-Original-Content-Length: 47\r\nx-goog-stored-content-length: 47\r\n"
    b"X-Body-Size: 47\r\n"
)


async def test_a_sanitized_answer_carries_no_digest_of_the_unsanitized_body(
    gateway: Gateway,
) -> None:
    """The caller knows every member of a sanitized answer but the redacted one, so a hash of
    the upstream's body (an ETag, a digest) lets it try every ssn offline until one matches,
    and the body's length tells how long the redacted value was.
    Nor is the caller's ``If-None-Match`` passed on: 304 or 200 would answer each guess."""
    gateway.upstream.answers["/crm/c"] = raw_answer(CUSTOMER, "application/json", fields=DIGESTS)
    gateway.upstream.answers["/payments/c"] = gateway.upstream.answers["/crm/c"]
    status, fields, body = await gateway.call("GET", "/crm/c", [("If-None-Match", 'W/"guess"')])
    assert status == 200 and json.loads(body)["customer"]["ssn"] == "[REDACTED]"
    digests = {b"etag", b"content-md5", b"digest", b"repr-digest", b"content-digest",
               b"x-amz-checksum-sha256", b"x-bz-content-sha1", b"x-oss-hash-crc64ecma",
               b"x-cos-hash-crc64ecma", b"x-ms-blob-content-md5", b"x_custom_digest",
               b"x-original-content-length", b"x-goog-stored-content-length",
               b"x-body-size"}  # fmt: skip
    assert not digests & set(fields)
    assert fields[b"last-modified"] == [b"Tue, 01 Dec 2026 10:00:00 GMT"]
    assert "if-none-match" not in gateway.upstream.heads[-1]
    # An answer relayed as it came keeps them: they describe what the caller receives.
    status, fields, body = await gateway.call("GET", "/payments/c", [("If-None-Match", '"x"')])
    assert status == 200 and body == CUSTOMER and digests <= set(fields)
    assert gateway.upstream.heads[-1]["if-none-match"] == '"x"'


async def test_a_card_number_written_as_a_json_number_is_masked_both_ways(
    gateway: Gateway,
) -> None:
    numbers = b'{"card": 4111111111111111, "again": 4111111111111111.0, "count": 42}'
    gateway.upstream.answers["/crm/n"] = raw_answer(numbers, "application/json")
    status, _, body = await gateway.call("GET", "/crm/n")
    assert status == 200 and b"4111111111111111" not in body, body
    # A 19-digit card read exactly (int(), %.0f), though its shortest form is not one.
    gateway.upstream.answers["/crm/f"] = raw_answer(
        b'{"card": 4111111111111111680.0}', "application/json"
    )
    status, _, exact = await gateway.call("GET", "/crm/f")
    assert (status, json.loads(exact)) == (200, {"card": "***************1680"}), exact
    assert json.loads(body) == {"card": "************1111", "again": "************1111",
                                "count": 42}  # fmt: skip
    status, _, body = await gateway.call(
        "POST", "/ledger/charge", [("Content-Type", "application/json")], numbers
    )
    assert status == 200, body
    assert json.loads(gateway.upstream.bodies[-1]) == {
        "card": "************1111", "again": "************1111", "count": 42
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"card=%34111111111111111", "text/plain"),
        (b"card=4111+1111+1111+1111", "application/x-www-form-urlencoded"),
        (b"card=4111 1111 1111 1111", "Application/X-WWW-Form-Urlencoded; charset=utf-8"),
        (b'var m = "ann\\x40example.com";', "application/javascript"),
        (b'var c = "\\064111111111111111";', "text/javascript"),
        (b'var c = "\\u{34}111111111111111";', "text/javascript"),
        (b"c = %u0034111111111111111", "text/plain"),
        (b"<p>ann&#64;example.com</p>", "text/html"),
        (b"<p>&#x34;111 1111 1111 1111</p>", "text/html"),
        (b'var c = "\\u{0000034}111 1111 1111 1111";', "text/javascript"),  # leading zeros
        (b'p::after { content: "\\34 111 1111 1111 1111"; }', "text/css"),  # CSS, not octal
        (b"<p>4111&#8203;1111&#8203;1111&#8203;1111</p>", "text/html"),  # zero-width spaces
        (b"<p>4111&nbsp1111&nbsp1111&nbsp1111</p>", "text/html"),  # a legacy name, no ';'
        (b"see /pay?c=4111+1111%201111+1111", "text/plain"),  # '+' and %20 read together
        (b"<p>ann&commat;example.com</p>", "text/html"),
        (b'{"mail":"ann\\u0040example.com"}\n', "application/x-ndjson"),
        (b'{"k": "AKIA\\u0049OSFODNN7EXAMPLE"}', "text/plain"),
        ("card \uff14\uff11\uff11\uff11 1111 1111 1111".encode(), "text/plain; charset=utf-8"),
        ("card \u0664\u0661\u0661\u0661 1111 1111 1111".encode(), "text/plain"),
        ("card \u2074\u00b9\u00b9\u00b9 1111 1111 1111".encode(), "text/plain"),  # superscripts
        ("mail ann\uff20example.com".encode(), "text/plain"),  # a fullwidth @
        # NFKC forms that are no digit to isdigit(): circled eleven, circled forty-one.
        ("card 4111 1111 1111 \u246a\u246a".encode(), "text/plain"),
        ("card \u32b6\u246a\u246a\u246a\u246a\u246a\u246a\u246a".encode(), "text/plain"),
        (b"<p>card 4111 1111 1111 111&sup1</p>", "text/html"),  # HTML reads it without ';'
        # JSON not labelled JSON: the client parses it, the masks read the number as written.
        (b'{"card": 4.111111111111111e15}\n', "application/x-ndjson"),
        (b'{"card": 4.111111111111111E15}', "text/json"),
        (b'{"card": 4.111111111111111E15}', "text/plain"),
        (b'{"card": 4.111111111111111E15}', None),
        (b'{"card": 41111111111111110e-1}', "application/jsonl"),
        (b'{"card":-4.111111111111111E+15}', "text/plain"),
        # Another charset in the body: ISO-2022-JP's ESC switches to fullwidth digits.
        (b'<html><head><meta charset="iso-2022-jp"></head><body>\x1b$B#4#1#1#1!!#1#1#1#1!!#1'
         b'#1#1#1!!#1#1#1#1\x1b(B</body></html>', "text/html"),
        (b'<meta charset="utf-7"><p>card +ADQ-111 1111 1111 1111</p>', "text/html"),
        (b"<meta http-equiv=Content-Type content='text/html; charset=utf-7'>+ADQ-111 1111 1111 "
         b"1111", "text/html"),
        (b'<?xml version="1.0" encoding="UTF-7"?><c>+ADQ-111 1111 1111 1111</c>', "application/xml"),
        (b"card \x1b$B#4#1#1#1\x1b(B111 1111 1111", "text/plain"),
        # Parts decode on their own: quoted-printable, base64 or UTF-7 hide the card number.
        (b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable"
         b"\r\n\r\ncard =34111 1111 1111 1111\r\n--b--\r\n", "multipart/mixed; boundary=b"),
        (b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nNDExMSAxMTExIDExMTEgMTExMQ==\r\n"
         b"--b--\r\n", "Multipart/Related; boundary=b"),
        (b"--b\r\nContent-Type: text/plain; charset=utf-7\r\n\r\ncard +ADQ-111 1111 1111 1111"
         b"\r\n--b--\r\n", "multipart/alternative; boundary=b"),
        (b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncard =34111 1111 1111 1111",
         "message/rfc822"),
    ],
)  # fmt: skip
async def test_a_text_answer_the_client_decodes_further_is_refused_under_masks(
    gateway: Gateway, body: bytes, content_type: str
) -> None:
    """A mask over text sees the text as written; a client that decodes an escape, a form's
    ``+`` or a fullwidth digit reads a card number, an address or a key the mask never saw."""
    gateway.upstream.answers["/notes/n"] = raw_answer(body, content_type)
    status, _, answer = await gateway.call("GET", "/notes/n")
    assert (status, json.loads(answer)["error"]) == (502, "bad_gateway"), answer
    assert "cannot be sanitized: a" in json.loads(answer)["error_description"]
    assert b"example" not in answer and b"111" not in answer and b"OSFO" not in answer
    # The shape of every refusal: code and message besides the OAuth pair.
    refusal = json.loads(answer)
    assert refusal["code"] == "bad_gateway" and refusal["message"] == refusal["error_description"]


async def test_masks_see_unicode_digits_and_at_signs_in_json_answers(gateway: Gateway) -> None:
    """Python's ``int()`` reads fullwidth and Arabic-Indic digits as 0-9, and NFKC makes a fullwidth
    at sign an ``@``: masks see JSON strings (decoded from escapes or not) as the client may read them."""
    fullwidth = "\uff14\uff11\uff11\uff11" + " \uff11\uff11\uff11\uff11" * 3
    body = json.dumps({"card": fullwidth, "arabic": "\u0664" + "\u0661" * 15,
                       "mail": "ann\uff20example.com"}, ensure_ascii=False).encode()  # fmt: skip
    escaped = json.dumps({"card": "\uff14" + "\uff11" * 15}).encode()  # \uff14… as escapes
    for path, answer in (("/notes/j", body), ("/notes/e", escaped)):
        gateway.upstream.answers[path] = raw_answer(answer, "application/json")
        status, _, got = await gateway.call("GET", path)
        assert status == 200, got
        values = json.loads(got)
        assert values["card"] in ("**** **** **** 1111", "************1111"), values
        assert all("111111" not in v.replace(" ", "") for v in values.values())
    assert json.loads(got) == {"card": "************1111"}
    status, _, got = await gateway.call("GET", "/notes/j")
    assert json.loads(got) == {"card": "**** **** **** 1111", "arabic": "************1111",
                               "mail": "[REDACTED:email]"}  # fmt: skip


async def test_masks_see_json_escapes_decoded_and_plain_text_as_written(gateway: Gateway) -> None:
    escaped = b'{"card": "\\u0034111111111111111", "mail": "ann\\u0040example.com"}'
    # Numbers with an exponent far from a card number's size, or inside a word, are plain text.
    fine = b"1e5 2.5E-3 a1e5 3f2e1e4b 10e30"
    gateway.upstream.answers["/notes/fine"] = raw_answer(fine, "text/plain")
    status, _, body = await gateway.call("GET", "/notes/fine")
    assert (status, body) == (200, fine)
    gateway.upstream.answers["/notes/json"] = raw_answer(escaped, "application/json")
    status, _, body = await gateway.call("GET", "/notes/json")
    assert status == 200, body
    assert json.loads(body) == {"card": "************1111", "mail": "[REDACTED:email]"}
    plain = b"card 4111 1111 1111 1111, mail ann@example.com; 100% & more"
    gateway.upstream.answers["/notes/text"] = raw_answer(plain, "text/plain; charset=utf-8")
    status, _, body = await gateway.call("GET", "/notes/text")
    assert (status, body) == (200, b"card **** **** **** 1111, mail [REDACTED:email]; 100% & more")
    html = b'<meta charset="UTF-8">\r\n<p>card\t4111 1111 1111 1111</p>'
    gateway.upstream.answers["/notes/html"] = raw_answer(html, "text/html")
    status, _, body = await gateway.call("GET", "/notes/html")
    assert (status, body) == (200, b'<meta charset="UTF-8">\r\n<p>card\t**** **** **** 1111</p>')


@pytest.mark.parametrize(
    "body",
    [
        b'{"html": "<p>&#52;111 1111 1111 1111</p>"}',
        b'{"html": "ann&#64;example.com"}',
        b'{"next": "/c?card=%34111%201111%201111%201111"}',
        b'{"next": "/c?card=4111+1111+1111+1111"}',
        b'{"s": "\\\\u0034111 1111 1111 1111"}',  # doubled: the string holds the escape
        b'{"note": "card 4.1111111111111110e15"}',
        b'{"note": "card 41111111111111110e-1"}',
        b'{"card &#52;111 1111 1111 1111": 1}',  # a member name
        '{"note": "card \uff14.1111111111111110e15"}'.encode(),
    ],
)  # fmt: skip
async def test_a_json_string_the_client_decodes_further_is_refused_under_masks(
    gateway: Gateway, body: bytes
) -> None:
    """The parser decodes JSON's escapes; a client may decode an HTML reference, ``%XX`` or a
    ``+`` in a string, or read a number with an exponent inside it, as the masks do not."""
    gateway.upstream.answers["/notes/s"] = raw_answer(body, "application/json")
    status, _, answer = await gateway.call("GET", "/notes/s")
    assert (status, json.loads(answer)["error"]) == (502, "bad_gateway"), answer
    assert "cannot be sanitized: a JSON answer" in json.loads(answer)["error_description"]
    assert b"111" not in answer and b"example" not in answer


async def test_json_strings_that_read_as_written_are_masked_not_refused(gateway: Gateway) -> None:
    body = json.dumps({"c": "\uff14.111111111111111e15", "n": "1.5e15 2+2", "x": "1e5"}).encode()
    gateway.upstream.answers["/notes/ok"] = raw_answer(body, "application/json")
    status, _, answer = await gateway.call("GET", "/notes/ok")
    assert (status, json.loads(answer)) == (
        200, {"c": "************1111", "n": "1.5e15 2+2", "x": "1e5"}
    ), answer  # fmt: skip


@pytest.mark.parametrize(
    "field",
    [("If-Match", '"guess"'), ("if_match", '"guess"'), ("If-Match", "*"),
     ("If-Unmodified-Since", "Tue, 01 Dec 2026 10:00:00 GMT"),
     ("If_Unmodified_Since", "Tue, 01 Dec 2026 10:00:00 GMT")],
)  # fmt: skip
async def test_a_precondition_on_a_sanitized_answer_is_refused(
    gateway: Gateway, field: tuple[str, str]
) -> None:
    """Django's ConditionalGetMiddleware answers a wrong ``If-Match`` 412 and a right one 200:
    with the ETag an MD5 of the unsanitized body, each call would test a guessed ssn. Dropped,
    the precondition would make a conditional write unconditional, so the call is refused before
    it reaches the upstream; a call relayed as it is keeps it."""
    before = len(gateway.upstream.heads)
    status, _, body = await gateway.call("PUT", "/crm/c", [field])
    answer = json.loads(body)
    assert (status, answer["error"]) == (400, "invalid_request"), body
    assert "If-Match" in answer["error_description"]
    assert len(gateway.upstream.heads) == before
    status, _, body = await gateway.call("PUT", "/payments/c", [field])
    assert status == 200 and gateway.upstream.heads[-1][field[0].lower()] == field[1]


@pytest.mark.parametrize("gateway", ["httptools", "h11"], indirect=True)
async def test_a_sanitized_answer_without_a_body_is_sent_without_one(gateway: Gateway) -> None:
    """A 204, a 304, an answer to HEAD or an empty answer has nothing to sanitize: none gets a
    body (JSON ``null`` with ``content-length: 4`` would be read by a keep-alive client as the
    start of its next answer). HEAD gets no length: the upstream's is that of the unsanitized
    body (how long the redacted ssn is); an answer relayed as it is keeps it."""
    answers = gateway.upstream.answers
    answers["/crm/204"] = b"HTTP/1.1 204 No Content\r\nContent-Type: application/json\r\n\r\n"
    answers["/crm/304"] = b"HTTP/1.1 304 Not Modified\r\nContent-Type: application/json\r\n\r\n"
    answers["/crm/head"] = answers["/payments/head"] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 47\r\n\r\n"
    )
    answers["/crm/empty"] = raw_answer(b"", "application/json")
    calls = [("GET", "/crm/204"), ("GET", "/crm/304"), ("HEAD", "/crm/head"),
             ("GET", "/crm/empty"), ("HEAD", "/payments/head"), ("GET", "/payments/after")]  # fmt: skip
    got = await exchange(gateway.port, *(gateway.request(m, p) for m, p in calls))
    heads = [head.lower().split(b"\r\n") for head, _ in got]
    assert [h[0] for h in heads] == [b"http/1.1 204 no content", b"http/1.1 304 not modified",
                                     b"http/1.1 200 ok", b"http/1.1 200 ok", b"http/1.1 200 ok",
                                     b"http/1.1 200 ok"]  # fmt: skip
    lengths = [[f for f in h if f.startswith(b"content-length:")] for h in heads]
    assert lengths[:5] == [[], [], [], [b"content-length: 0"],
                           [b"content-length: 47"]]  # fmt: skip
    assert [body for _, body in got] == [b"", b"", b"", b"", b"", b'{"ok":true}']


@pytest.mark.parametrize("gateway", ["httptools", "h11"], indirect=True)
@pytest.mark.parametrize("path", ["/crm/101", "/payments/101"])
async def test_an_interim_status_from_the_upstream_is_refused(gateway: Gateway, path: str) -> None:
    """A 101 switches the connection to a protocol no decision covers (no Upgrade is forwarded
    to ask for it): httptools relayed it, h11 failed on it. Either way it is a 502, and the
    connection goes on serving the next call."""
    gateway.upstream.answers[path] = (
        b"HTTP/1.1 101 Switching Protocols\r\nContent-Type: application/json\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + CUSTOMER
    )
    got = await exchange(
        gateway.port, gateway.request("GET", path), gateway.request("GET", "/payments/after")
    )
    (head, body), (after, rest) = got
    assert head.startswith(b"HTTP/1.1 502"), head
    assert (
        json.loads(body)["error"] == "bad_gateway" and b"101" in body and SSN.encode() not in body
    )
    assert after.startswith(b"HTTP/1.1 200") and rest == b'{"ok":true}'


async def test_header_bytes_outside_latin_1_are_relayed_as_received(gateway: Gateway) -> None:
    """``X-Name: €`` in UTF-8 is three bytes an ASGI server sends as they are; decoded by the
    client library and encoded again as Latin-1 it was a 500 after the call was allowed."""
    fields = "X-Name: caf\u00e9 \u20ac\r\nX-Card: 4111111111111111\r\n".encode()
    fields += b"X-Control: a\x01b\r\nX-Delete: \x7f\r\nX-Tab: a\tb\r\n"  # no ASGI server sends them
    big = b'{"pad": "' + b"x" * 100_000 + b'"}'  # relayed chunk by chunk
    gateway.upstream.answers.update({
        "/payments/u": raw_answer(b"{}", "application/json", fields=fields),
        "/payments/big": raw_answer(big, "application/json", fields=fields),
        "/crm/u": raw_answer(b"{}", "application/json", fields=fields),
    })  # fmt: skip
    for path in ("/payments/u", "/payments/big", "/crm/u"):
        status, got, body = await gateway.call("GET", path)
        assert status == 200, body
        assert got[b"x-name"] == ["caf\u00e9 \u20ac".encode()]
        card = b"************1111" if path.startswith("/crm") else b"4111111111111111"
        assert got[b"x-card"] == [card]
        assert got[b"x-tab"] == [b"a\tb"] and not {b"x-control", b"x-delete"} & set(got)


@pytest.mark.parametrize(
    "field",
    [
        b"Location: /c?card=4111%201111%201111%201111\r\n",
        b"X-Card: %34111111111111111\r\n",
        b"X-Mail: ann%40example.com\r\n",
        b"Set-Cookie: c=4111+1111+1111+1111\r\n",
        b"Link: <https://x/?m=ann&#64;example.com>\r\n",
        "X-Card: \uff14\uff11\uff11\uff11 1111 1111 1111\r\n".encode(),
        "X-Mail: ann\uff20example.com\r\n".encode(),
        b"X-Card: \xb9111 1111 1111 1111\r\n",  # a superscript one in Latin-1
        b"X-Card: 4.111111111111111e15\r\n",
        b"X-4111111111111111: y\r\n",  # masks would change the name itself
        b"Location: /pay?c=%34111+1111+1111+1111\r\n",  # %34 and '+' decoded together
        b"Location: /pay?c=4%B9%B9%B9+1111+1111+1111\r\n",  # Latin-1 superscript ones
    ],
)  # fmt: skip
async def test_an_answer_field_the_masks_cannot_read_is_left_out(
    gateway: Gateway, field: bytes
) -> None:
    """Masks read a field value as written; a client decodes ``%20``, ``+``, ``&#64;`` or reads
    a fullwidth digit, so a field that holds any is left out of a masked answer."""
    fields = field + b"X-Card-Plain: 4111 1111 1111 1111\r\nX-Kept: ok\r\n"
    gateway.upstream.answers["/notes/h"] = raw_answer(b"ok", "text/plain", "302 Found", fields)
    status, got, _ = await gateway.call("GET", "/notes/h")
    name = field.partition(b":")[0].lower()
    assert status == 302 and name not in got, got
    assert got[b"x-card-plain"] == [b"**** **** **** 1111"] and got[b"x-kept"] == [b"ok"]
    gateway.upstream.answers["/payments/h"] = gateway.upstream.answers["/notes/h"]
    status, got, _ = await gateway.call("GET", "/payments/h")
    assert status == 302 and name in got  # relayed as it is without masks


async def test_an_answer_field_whose_escapes_hide_nothing_is_kept(gateway: Gateway) -> None:
    """A redirect to a presigned URL or a file with a space in its name keeps its Location."""
    location = b"Location: https://files.example.com/dl?name=Q1%20report.pdf&X-Amz-Date=2026+1\r\n"
    gateway.upstream.answers["/notes/l"] = raw_answer(b"ok", "text/plain", "302 Found", location)
    status, got, _ = await gateway.call("GET", "/notes/l")
    assert status == 302 and got[b"location"] == [location[10:-2]], got


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ([], [b"private"]),
        ([b"public, max-age=600"], [b"public, max-age=600", b"private"]),
        ([b"max-age=600", b"s-maxage=600"], [b"max-age=600", b"s-maxage=600", b"private"]),
        # Qualified, private lets a shared cache store all but the fields it names.
        ([b'private="set-cookie", max-age=60'], [b'private="set-cookie", max-age=60', b"private"]),
        ([b'no-cache="x, private"'], [b'no-cache="x, private"', b"private"]),
        ([b"no-store"], [b"no-store"]),
        ([b"Private, max-age=5"], [b"Private, max-age=5"]),
    ],
)  # fmt: skip
async def test_a_proxied_answer_is_never_for_a_shared_cache(
    gateway: Gateway, given: list[bytes], sent: list[bytes]
) -> None:
    """Each answer is the outcome of one caller's decision: a shared cache in front of the
    gateway must not serve it to another agent, whose call would never be decided (RFC 9111
    §3.5 lets it when the upstream says ``public``)."""
    fields = b"".join(b"Cache-Control: " + v + b"\r\n" for v in given)
    for path in ("/payments/c", "/crm/c"):
        gateway.upstream.answers[path] = raw_answer(b"{}", "application/json", fields=fields)
        status, got, _ = await gateway.call("GET", path)
        assert (status, got.get(b"cache-control")) == (200, sent), path


async def test_no_proxied_answer_steers_a_cache_in_front_of_the_gateway(gateway: Gateway) -> None:
    """nginx's ``X-Accel-Expires`` overrides ``Cache-Control: private`` (and ``X-Accel-Redirect``
    makes it serve another location); CDNs obey ``Surrogate-Control`` and ``CDN-Cache-Control``
    (RFC 9213). An upstream's copy of any of them would let a shared cache serve the answer to
    another agent, so none leaves the gateway, sanitized or not."""
    fields = (b"X-Accel-Expires: 600\r\nX-Accel-Redirect: /internal\r\nX_Accel_Buffering: no\r\n"
              b"Surrogate-Control: max-age=600\r\nCDN-Cache-Control: public, max-age=600\r\n"
              b"Cloudflare-CDN-Cache-Control: max-age=600\r\nX-Kept: 1\r\n")  # fmt: skip
    for path in ("/payments/c", "/crm/c"):
        gateway.upstream.answers[path] = raw_answer(b"{}", "application/json", fields=fields)
        status, got, _ = await gateway.call("GET", path)
        assert status == 200 and got[b"x-kept"] == [b"1"], path
        assert got[b"cache-control"] == [b"private"], path
        steering = {b"x-accel-expires", b"x-accel-redirect", b"x_accel_buffering",
                    b"surrogate-control", b"cdn-cache-control", b"cloudflare-cdn-cache-control"}  # fmt: skip
        assert not steering & set(got), path


async def test_a_sanitized_answer_with_two_content_types_is_refused(gateway: Gateway) -> None:
    """The masks read the text by the first type; a client may join the fields and take the
    charset of the last (requests does): as UTF-7 ``+ADQ-`` is a ``4``."""
    assert b"+ADQ-111 1111 1111 1111".decode("utf-7") == "4111 1111 1111 1111"
    gateway.upstream.answers["/notes/two"] = raw_answer(
        b"card +ADQ-111 1111 1111 1111", "text/plain",
        fields=b"Content-Type: text/plain; charset=utf-7\r\n",
    )  # fmt: skip
    status, _, body = await gateway.call("GET", "/notes/two")
    assert (status, json.loads(body)["error"]) == (502, "bad_gateway"), body
    assert "Content-Type" in json.loads(body)["error_description"]


@pytest.mark.parametrize("depth", [600, 900, 3000])
async def test_json_nested_too_deeply_to_sanitize_is_refused(gateway: Gateway, depth: int) -> None:
    """Redaction and masks walk the answer recursively; an answer nested deeper than they can
    walk is a 502 like any other that cannot be sanitized, never a 500."""
    body = b'{"a":' * depth + b'"4111 1111 1111 1111"' + b"}" * depth
    gateway.upstream.answers["/crm/deep"] = raw_answer(body, "application/json")
    status, _, answer = await gateway.call("GET", "/crm/deep")
    assert (status, json.loads(answer)["error"]) == (502, "bad_gateway"), answer[:200]
    assert b"4111" not in answer


async def test_a_json_answer_labelled_us_ascii_is_sanitized(gateway: Gateway) -> None:
    """US-ASCII is UTF-8's subset, as it is for text answers: such an answer is read, not refused."""
    for label in ("us-ascii", "ascii"):
        answer = raw_answer(CUSTOMER, f"application/json; charset={label}")
        gateway.upstream.answers["/crm/a"] = answer
        status, _, body = await gateway.call("GET", "/crm/a")
        assert (status, json.loads(body)) == (
            200, {"customer": {"name": "ann", "ssn": "[REDACTED]"}, "card": "************1111"}
        ), body  # fmt: skip


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"url": "https://cdn.example.com/files/Q1%20report.pdf", "card": "4111 1111 1111 1111"}',
         "application/json"),
        (b'{"html": "<a href=\\"/x?a=1&amp;b=2\\">Tom &amp; Jerry</a>"}', "application/json"),
        (b'{"path": "C:\\\\builds\\\\x64\\\\2024\\\\out.log"}', "application/json"),
        (b"<p>Tom &amp; Jerry &copy; 2026, card 4111 1111 1111 1111</p>", "text/html"),
        (b"see https://files.example.com/dl?name=Q1%20report.pdf", "text/plain"),
    ],
)  # fmt: skip
async def test_escapes_that_hide_nothing_are_masked_and_passed_on(
    gateway: Gateway, body: bytes, content_type: str
) -> None:
    """A URL's %20 or HTML's &amp; decodes to nothing the masks look for: the answer is masked
    and passed on, not refused."""
    gateway.upstream.answers["/notes/plain"] = raw_answer(body, content_type)
    status, _, answer = await gateway.call("GET", "/notes/plain")
    assert status == 200, answer
    assert b"4111 1111 1111 1111" not in answer


async def test_a_binary_answer_under_masks_is_refused_naming_its_type(gateway: Gateway) -> None:
    """Masks read text: a PDF is refused with a message that names its type and the fix."""
    gateway.upstream.answers["/notes/f.pdf"] = raw_answer(b"%PDF-1.7\x00\x01", "application/pdf")
    status, _, answer = await gateway.call("GET", "/notes/f.pdf")
    assert status == 502, answer
    assert "application/pdf answer cannot be sanitized" in json.loads(answer)["message"]


@pytest.mark.parametrize("value", ["/pay?c=4111+1111%201111+1111", "/pay?c=%34111+1111+1111+1111"])
async def test_a_json_string_decoded_as_a_form_is_refused_under_masks(
    gateway: Gateway, value: str
) -> None:
    """URLSearchParams reads '+' as a space and %XX as its byte in one pass."""
    body = json.dumps({"u": value}).encode()
    gateway.upstream.answers["/notes/u"] = raw_answer(body, "application/json")
    status, _, answer = await gateway.call("GET", "/notes/u")
    assert status == 502 and b"1111" not in answer, answer


async def test_a_large_answer_is_sanitized_off_the_event_loop_alike(gateway: Gateway) -> None:
    """Over 16 KiB the masks run on a worker thread: the same masking, the same refusals."""
    rows = [{"note": f"row {i}", "card": "4111 1111 1111 1111"} for i in range(600)]
    gateway.upstream.answers["/notes/big"] = raw_answer(
        json.dumps(rows).encode(), "application/json"
    )
    status, _, answer = await gateway.call("GET", "/notes/big")
    assert status == 200 and len(answer) > 16 * 1024, answer[:200]
    assert b"4111 1111" not in answer and answer.count(b"**** **** **** 1111") == 600
    rows[599]["note"] = "&#52;111 1111 1111 1111"
    gateway.upstream.answers["/notes/big"] = raw_answer(
        json.dumps(rows).encode(), "application/json"
    )
    status, _, answer = await gateway.call("GET", "/notes/big")
    assert status == 502 and b"1111" not in answer, answer[:200]
