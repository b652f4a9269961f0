"""Masks and redactions see what the other side reads: markup a reader renders away (HTML tags
and comments, Markdown and quoted-printable escapes) inside a card number or an address refuses
an answer to mask; request masks refuse encoded forms the upstream decodes (``%34``, a form's
``+`` in a cookie or a Referer query, ``&#52;``), as answer masks do; and a redaction reaches a
member inside a string holding a JSON document (double-encoded JSON). Over real HTTP, a real
gateway before a raw upstream."""

from __future__ import annotations

import json

import pytest

from tests.gateway.harness import raw_answer
from tests.gateway.test_proxy_answers import Gateway, gateway  # noqa: F401  (fixture)


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:  # noqa: F811  (the answers tests' gateway and policy)
    return gateway


@pytest.mark.parametrize(
    "body",
    [
        # Rendered: "4111 1111 1111 1111" / "ann@example.com".
        b"<p>Card: <span>4111</span> <span>1111</span> <span>1111</span> <span>1111</span></p>",
        b"<p>Card: 4111<!-- --> 1111 1111 1111</p>",
        b"<p>Contact: <b>ann</b>@example.com</p>",
        b"<p>Contact: ann<wbr>@example.com</p>",
    ],
)
async def test_html_markup_hides_card_and_address_from_text_masks(
    gw: Gateway,
    body: bytes,
) -> None:
    """A text/html answer is masked as written; markup between the digits (or around the local
    part) is invisible to a reader of the rendered text but breaks the mask's run."""
    gw.upstream.answers["/notes/n"] = raw_answer(body, "text/html; charset=utf-8")
    status, _, out = await gw.call("GET", "/notes/n")
    assert status == 502, (status, out)


@pytest.mark.parametrize(
    "body",
    [
        b'{"note": "Card: <span>4111</span> <span>1111</span> <span>1111</span> <span>1111</span>"}',
        b'{"note": "Contact: <b>ann</b>@example.com"}',
    ],
)
async def test_html_markup_in_json_string_hides_card_from_masks(
    gw: Gateway,
    body: bytes,
) -> None:
    gw.upstream.answers["/notes/j"] = raw_answer(body, "application/json")
    status, _, out = await gw.call("GET", "/notes/j")
    assert status == 502, (status, out)


@pytest.mark.parametrize(
    "value",
    [
        "4111+1111+1111+1111",  # a form reader's spaces; refused in an answer
        "%34111111111111111",  # percent-encoded '4'; refused in an answer
        "&#52;111111111111111",  # HTML reference; refused in an answer
        "ann&#64;example.com",
        "ann%40example.com",
    ],
)
async def test_request_json_string_escapes_pass_request_masks(gw: Gateway, value: str) -> None:
    """The same strings that a response mask refuses (docs/gw.md "Masks see what the
    client reads") pass a request mask unmasked: the upstream receives them as sent."""
    body = json.dumps({"memo": value}).encode()
    status, _, out = await gw.call(
        "POST", "/ledger/charge", [("Content-Type", "application/json")], body
    )
    assert (status, json.loads(out)["code"]) == (403, "policy_error"), (status, out)
    assert gw.upstream.bodies == [], "forwarded"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Cookie", "memo=4111+1111+1111+1111"),  # PHP's $_COOKIE decodes '+' and %XX
        ("X-Memo", "4111%201111%201111%201111"),
        ("Referer", "https://shop.example/pay?card=4111+1111+1111+1111"),
    ],
)
async def test_request_header_encodings_pass_request_masks(
    gw: Gateway,
    name: str,
    value: str,
) -> None:
    body = json.dumps({"amount": 1}).encode()
    status, _, out = await gw.call(
        "POST", "/ledger/charge", [("Content-Type", "application/json"), (name, value)], body
    )
    assert (status, json.loads(out)["code"]) == (403, "policy_error"), (status, out)
    assert gw.upstream.bodies == [], "forwarded"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        # Markdown renders "\@" as "@" and "\-" as "-" (CommonMark backslash escapes).
        (b"Contact: ann\\@example.com", "text/markdown; charset=utf-8"),
        (b"Card: 4111\\-1111\\-1111\\-1111", "text/markdown; charset=utf-8"),
        # vCard 2.1 quoted-printable: a vCard reader decodes =40 to "@".
        (
            b"BEGIN:VCARD\r\nVERSION:2.1\r\nEMAIL;ENCODING=QUOTED-PRINTABLE:ann=40example.com\r\n"
            b"END:VCARD\r\n",
            "text/vcard; charset=utf-8",
        ),
    ],
)
async def test_text_escapes_the_checks_do_not_know_pass_unmasked(
    gw: Gateway,
    body: bytes,
    ctype: str,
) -> None:
    gw.upstream.answers["/notes/m"] = raw_answer(body, ctype)
    status, _, out = await gw.call("GET", "/notes/m")
    assert status == 502, (status, out)


async def test_redaction_misses_a_member_inside_a_json_encoded_string(gw: Gateway) -> None:
    """``customer`` holds the customer as a JSON document in a string (double-encoded JSON, as
    many APIs send): a client parses it and reads customer.ssn; the redaction never sees it."""
    inner = json.dumps({"name": "ann", "ssn": "123-45-6789"})
    body = json.dumps({"customer": inner}).encode()
    gw.upstream.answers["/crm/c"] = raw_answer(body, "application/json")
    status, _, out = await gw.call("GET", "/crm/c")
    assert status == 200, out
    assert json.loads(json.loads(out)["customer"]) == {"name": "ann", "ssn": "[REDACTED]"}


async def test_plain_markup_and_masked_values_still_pass(gw: Gateway) -> None:
    """Markup around what the masks already found, or holding nothing they look for, is an
    answer like any other; a request whose data the masks see as written is masked and sent."""
    page = b"<p>Card: <b>4111 1111 1111 1111</b> <i>a=1&amp;b=2</i> 5 \\* 3</p>"
    gw.upstream.answers["/notes/ok"] = raw_answer(page, "text/html; charset=utf-8")
    status, _, out = await gw.call("GET", "/notes/ok")
    assert status == 200 and b"4111 1111 1111 1111" not in out and b"<b>" in out, out
    body = json.dumps({"memo": "card 4111 1111 1111 1111"}).encode()
    status, _, out = await gw.call("POST", "/ledger/charge",
                                        [("Content-Type", "application/json")], body)  # fmt: skip
    assert status == 200, out
    assert "4111 1111 1111 1111" not in json.loads(gw.upstream.bodies[-1])["memo"]
