"""Obligations: redaction by path, masks and dropped headers, never mutating the input."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.policy.decision import SanitizeObligation as S
from aegis.policy.obligations import (
    EMAIL_MASK,
    REDACTED,
    SECRET_MASK,
    apply_to_body,
    apply_to_headers,
    mask_text,
)


def test_redact_paths_with_wildcards_and_lists() -> None:
    body = {
        "customers": [{"ssn": "1", "name": "a"}, {"ssn": "2"}],
        "meta": {"x": {"k": 1}, "y": {"k": 2}},
    }
    before = copy.deepcopy(body)
    out = apply_to_body(
        body,
        [S("redact", "response", path="customers.ssn"), S("redact", "response", path="meta.*.k")],
        "response",
    )
    assert out == {
        "customers": [{"ssn": REDACTED, "name": "a"}, {"ssn": REDACTED}],
        "meta": {"x": {"k": REDACTED}, "y": {"k": REDACTED}},
    }
    assert body == before


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # JSON:API's shape: the '*' meets a list, and the key lies inside each element.
        ("data.*.ssn", {"data": [{"attributes": {"ssn": "1"}}, {"id": "2"}]},
         {"data": [{"attributes": {"ssn": REDACTED}}, {"id": "2"}]}),
        ("*.ssn", [{"customer": {"ssn": "1"}}], [{"customer": {"ssn": REDACTED}}]),
        # The '*' still reads as the index too, and nested lists are walked.
        ("data.*.ssn", {"data": [{"ssn": "1"}, [{"ssn": "2"}]]},
         {"data": [{"ssn": REDACTED}, [{"ssn": REDACTED}]]}),
        ("data.*", {"data": [{"a": 1}, "x"]}, {"data": [REDACTED, REDACTED]}),
    ],
)  # fmt: skip
def test_a_wildcard_meeting_a_list_reads_as_its_index_and_as_its_elements_keys(
    path: str, body: Any, expected: Any
) -> None:
    assert apply_to_body(body, [S("redact", "response", path=path)], "response") == expected


def test_redact_matches_member_names_in_any_case() -> None:
    """Go's encoding/json and ASP.NET bind ``SSN`` to a field ``ssn``: it is hidden as ssn is."""
    body = {"SSN": "123-45-6789", "Payee": {"Iban": "DE00", "name": "a"}, "ssnote": "keep",
            "p\u0131n": "1234"}  # fmt: skip
    out = apply_to_body(
        body,
        [S("redact", "request", path="ssn"), S("redact", "request", path="payee.iban"),
         S("redact", "request", path="pin")],
        "request",
    )  # fmt: skip
    assert out == {"SSN": REDACTED, "Payee": {"Iban": REDACTED, "name": "a"}, "ssnote": "keep",
                   "p\u0131n": REDACTED}  # fmt: skip


def test_redact_reads_dotted_member_names_as_paths() -> None:
    """Elasticsearch-style readers take ``{"customer.ssn": …}`` for the path customer.ssn: a
    member whose dotted name equals, reaches into or continues the redacted path is hidden."""
    body = {"customer.ssn": "1", "Customer.SSN.last4": "2", "customer.name": "a",
            "customer": {"ssn.value": "3", "name": "b"}, "customers.ssn": "4",
            "a.customer": {"ssn": "5"}, "x": {"customer.ssn": "6"}}  # fmt: skip
    out = apply_to_body(body, [S("redact", "response", path="customer.ssn")], "response")
    assert out == {"customer.ssn": REDACTED, "Customer.SSN.last4": REDACTED,
                   "customer.name": "a", "customer": {"ssn.value": REDACTED, "name": "b"},
                   "customers.ssn": "4", "a.customer": {"ssn": "5"},
                   "x": {"customer.ssn": "6"}}  # fmt: skip
    deep = {"a.b": {"c": "1", "d": "2"}, "a": {"b.c": "3"}}
    out = apply_to_body(deep, [S("redact", "response", path="a.*.c")], "response")
    assert out == {"a.b": {"c": REDACTED, "d": "2"}, "a": {"b.c": REDACTED}}


def test_obligations_apply_only_to_their_target() -> None:
    ob = [S("mask", "request", pattern="email")]
    assert apply_to_body({"e": "a@b.co"}, ob, "response") == {"e": "a@b.co"}
    assert apply_to_body({"e": "a@b.co"}, ob, "request") == {"e": EMAIL_MASK}


def test_card_numbers_keep_the_last_four_luhn_valid_only() -> None:
    assert mask_text("card 4111 1111 1111 1111.", ["card_number"]) == "card **** **** **** 1111."
    assert mask_text("4111-1111-1111-1111", ["card_number"]) == "****-****-****-1111"
    assert mask_text("order 4111111111111112", ["card_number"]) == "order 4111111111111112"


def test_card_numbers_with_other_separators_are_masked() -> None:
    """A reader takes doubled spaces, tabs, `` - ``, dots, underscores and Unicode dashes
    between the digits for the same card number; up to three separators may stand between two."""
    for sep in ("  ", "\t", " - ", ".", "_", "\u2011", "\u2013", "\u2212", "\u00a0", " \u2014 "):
        text = sep.join(["4111", "1111", "1111", "1111"])
        masked = mask_text(f"card {text}.", ["card_number"])
        assert masked == f"card {sep.join(['****'] * 3 + ['1111'])}.", (sep, masked)
    assert mask_text("4_111_111_111_111_111", ["card_number"]) == "*_***_***_***_**1_111"
    assert mask_text("4111    1111 1111 1111", ["card_number"]) == "4111    1111 1111 1111"
    assert mask_text("4111.1111.1111.1112", ["card_number"]) == "4111.1111.1111.1112"


def test_emails_and_secrets_are_masked() -> None:
    text = "mail bob.smith+x@mail.example.org key AKIAABCDEFGHIJKLMNOP jwt eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"
    out = mask_text(text, ["email", "secret"])
    assert "bob.smith" not in out
    assert "AKIA" not in out
    assert "eyJ" not in out
    assert out.count(SECRET_MASK) == 2
    assert EMAIL_MASK in out
    pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    assert mask_text(pem, ["secret"]) == SECRET_MASK
    assert (
        mask_text("Authorization: Bearer abcdefghijklmnopqrstu", ["secret"])
        == f"Authorization: {SECRET_MASK}"
    )


def test_secrets_and_addresses_in_their_wider_forms_are_masked() -> None:
    """Fine-grained GitHub tokens, AWS keys after ``_``, Unicode addresses (masked whole) and a
    JWT whose header JSON holds whitespace (``eyAi…``) are masked; three base64url segments whose
    first decodes to no JSON object are not a JWT."""
    jwt = ".".join(
        base64.urlsafe_b64encode(part).rstrip(b"=").decode()
        for part in (b'{ "alg": "HS256", "typ": "JWT" }', b'{ "sub": "admin" }', b"signature")
    )
    pat = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789"
    text = f"t {pat} id ID_AKIAIOSFODNN7EXAMPLE s ASIAIOSFODNN7EXAMPLE j {jwt} n ew1234.abcd.efgh"
    assert mask_text(text, ["secret"]) == (
        f"t {SECRET_MASK} id ID_{SECRET_MASK} s {SECRET_MASK} j {SECRET_MASK} n ew1234.abcd.efgh"
    )
    mails = "ann@ex\u00e4mple.com, j\u00f6rg@example.com and o'neil@example.org"
    assert mask_text(mails, ["email"]) == f"{EMAIL_MASK}, {EMAIL_MASK} and {EMAIL_MASK}"
    assert mask_text("mail \uff41\uff4e\uff4e@example.com", ["email"]) == f"mail {EMAIL_MASK}"


@pytest.mark.parametrize(
    "key",
    [
        "sk-" + "A1b2C3d4E5f6G7h8I9j0" * 2 + "T3BlbkFJ",  # OpenAI, the first format
        "sk-proj-" + "Ab3_x-Yz9" * 16,  # OpenAI project key
        "sk-svcacct-" + "q8R_2fLm" * 10,
        "sk-ant-api03-" + "Zx9_Qw-8Er" * 9 + "AA",  # Anthropic
        "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",  # Google
        "glpat-" + "xY7_aB3-cD9eF1gH2iJ4",  # GitLab personal access token
        "gldt-" + "k2L9mN4pQ7rS1tU5vW8x",  # GitLab deploy token
        "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567",  # Hugging Face
        "npm_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "pypi-AgEIcHlwaS5vcmc" + "CJDk3ZjVmZTc3LWI2NzgtNGM" * 3,
        "ghp_" + "a1B2c3D4e5F6" * 3,  # GitHub
        "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",  # Stripe
        "xoxb-" + "1234567890-abcdefghij",  # Slack
    ],
)
def test_provider_api_keys_are_masked(key: str) -> None:
    for text, expected in (
        (f"key {key} end", f"key {SECRET_MASK} end"),
        (f'{{"k": "{key}"}}', f'{{"k": "{SECRET_MASK}"}}'),
        (f"OPENAI_API_KEY={key}", f"OPENAI_API_KEY={SECRET_MASK}"),
        # After "_" (no word boundary there), as AWS keys are: a name glued to the key.
        (f"ID_{key}", f"ID_{SECRET_MASK}"),
    ):
        assert mask_text(text, ["secret"]) == expected, (key, text)


@pytest.mark.parametrize(
    "text",
    [
        "see sk-learn-tutorial-page-for-beginners",  # a slug: no digit
        "sk-1",  # too short
        "AIzaShort",
        "global-configuration-settings-page",
        "glpat-short",
        "task-3f9a for the handbook",
    ],
)
def test_words_that_only_resemble_keys_are_kept(text: str) -> None:
    assert mask_text(text, ["secret"]) == text


@pytest.mark.parametrize(
    "address",
    [
        '"ann lee"@example.com',
        '"ann\\"x"@example.com',
        "ann@[192.0.2.1]",
        "ann@[IPv6:2001:db8::1]",
        '"a@b"@example.org',
    ],
)
def test_quoted_local_parts_and_address_literals_are_masked_whole(address: str) -> None:
    assert mask_text(f"mail {address} now", ["email"]) == f"mail {EMAIL_MASK} now", address


def test_headers_are_dropped_case_insensitively_and_masked() -> None:
    ob = [S("drop_header", "response", header="x-debug"), S("mask", "response", pattern="email")]
    assert apply_to_headers({"X-Debug": "1", "X-User": "a@b.io"}, ob, "response") == {
        "X-User": EMAIL_MASK
    }


def test_a_dropped_header_is_dropped_in_its_underscored_spelling_too() -> None:
    ob = [S("drop_header", "request", header="X-Internal_Override")]
    headers = {"x_internal_override": "a", "X-INTERNAL-OVERRIDE": "b", "x-internal": "c"}
    assert apply_to_headers(headers, ob, "request") == {"x-internal": "c"}


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    local=st.from_regex(r"[a-z0-9._]{1,10}", fullmatch=True),
    domain=st.from_regex(r"[a-z]{1,8}\.[a-z]{2,4}", fullmatch=True),
    pad=st.text(alphabet=" ,;:", max_size=3),
)
def test_no_email_survives_masking(local: str, domain: str, pad: str) -> None:
    out = apply_to_body(
        {"n": [f"{pad}{local}@{domain}{pad}"]}, [S("mask", "response", pattern="email")], "response"
    )
    assert "@" not in out["n"][0]


def test_masks_reach_object_keys_too() -> None:
    body = {"bob@example.com": {"card": "4111 1111 1111 1111"}, "plain": "x"}
    out = apply_to_body(body, [S("mask", "response", pattern="email"),
                               S("mask", "response", pattern="card_number")], "response")  # fmt: skip
    assert out == {EMAIL_MASK: {"card": "**** **** **** 1111"}, "plain": "x"}


def test_a_card_number_written_as_a_json_number_is_masked() -> None:
    """JSON carries ``{"card": 4111111111111111}`` as well as a string: a number is tested as
    the decimal text a reader prints (JavaScript prints 4.111111111111117e18, re-encoded so, as
    4111111111111117000, a Luhn-valid card number), and replaced by the masked text when a
    pattern matches."""
    body = {"card": 4111111111111111, "float": 4111111111111111.0, "neg": [-4111111111111111],
            "big": 4.111111111111117e18, "order": 4111111111111112, "n": 42, "x": 1.5,
            "e": 4.111111111111111e18, "ok": True}  # fmt: skip
    for target in ("request", "response"):
        out = apply_to_body(body, [S("mask", target, pattern="card_number")], target)
        assert out == {"card": "************1111", "float": "************1111",
                       "neg": ["-************1111"], "big": "***************7000",
                       "order": 4111111111111112, "n": 42, "x": 1.5, "e": 4.111111111111111e18,
                       "ok": True}  # fmt: skip
    assert body["card"] == 4111111111111111  # the input is not changed


def test_a_string_holding_a_card_number_with_an_exponent_is_masked() -> None:
    """``float("4.111111111111111e15")`` is the card number; masks over the string as written
    see none, so it is masked as the whole number it reads as."""
    ob = [S("mask", "response", pattern="card_number")]
    body = {"a": "4.111111111111111e15", "b": " 41111111111111110E-1", "c": "1e5", "d": "2.5e3x"}
    assert apply_to_body(body, ob, "response") == {
        "a": "************1111",
        "b": "************1111",
        "c": "1e5",
        "d": "2.5e3x",
    }


def test_masks_see_unicode_digits_and_at_signs_as_a_reader_does() -> None:
    """``int()`` reads fullwidth and Arabic-Indic digits as 0-9, NFKC a fullwidth at sign as ``@``:
    request bodies and answers alike are masked as read, and returned in that form."""
    ob = [S("mask", "request", pattern="card_number"), S("mask", "request", pattern="email")]
    body = {"a": "\uff14" + "\uff11" * 15, "b": "\u0664" + "\u0661" * 15,
            "c": "ann\uff20example.com", "d": "caf\u00e9 \uff11\uff12", "\uff41@b.co": 1}  # fmt: skip
    assert apply_to_body(body, ob, "request") == {
        "a": "************1111", "b": "************1111", "c": EMAIL_MASK,
        "d": "caf\u00e9 \uff11\uff12", EMAIL_MASK: 1,
    }  # fmt: skip


def test_a_float_is_masked_by_its_exact_value_too() -> None:
    """``4111111111111111680.0`` prints as ``4.1111111111111117e+18`` (not Luhn-valid), but
    ``int()`` and ``%.0f`` print its exact value, a valid 19-digit card number."""
    ob = [S("mask", "response", pattern="card_number")]
    body = {"n": 4111111111111111680.0, "s": "4.1111111111111117e18", "k": 1e18}
    assert apply_to_body(body, ob, "response") == {
        "n": "***************1680",
        "s": "***************1680",
        "k": 1e18,
    }


def test_a_card_next_to_other_digits_is_masked_within_its_run() -> None:
    """An expiry after the card, a quantity before it, a CVV beside it: the run of digit groups
    fails the Luhn check as a whole, the card within it does not."""
    for text, masked in [
        ("card 4111 1111 1111 1111 12/27", "card **** **** **** 1111 12/27"),
        ("qty 1 4111 1111 1111 1111", "qty 1 **** **** **** 1111"),
        ("4111111111111111 123", "************1111 123"),
    ]:
        assert mask_text(text, ["card_number"]) == masked
    assert mask_text("order 20261207123456", ["card_number"]) == "order 20261207123456"


def test_format_characters_between_digits_do_not_hide_a_card() -> None:
    """A zero-width space or a soft hyphen shows as nothing: the client reads one number."""
    for sep in ("\u200b", "\u00ad", "\u2060", "\ufeff"):
        assert "4111" + sep not in mask_text(sep.join(["4111", "1111", "1111", "1111"]),
                                              ["card_number"])  # fmt: skip
