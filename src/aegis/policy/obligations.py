"""Sanitization obligations: redact JSON paths, mask sensitive patterns, drop headers.

The gateway applies a ``sanitize`` decision's obligations with these functions: to the request
body and headers before forwarding (``target: request``) and to the response before answering
(``target: response``). They never mutate their arguments. Masking covers e-mail addresses, payment
card numbers (13-19 digits, up to three spaces, dots, underscores or dashes between two, Luhn-valid;
the last four digits are kept)
and common secret formats (cloud keys, provider API keys, AI providers' and package registries'
tokens, JWTs, bearer credentials, PEM private keys). Masks read JSON numbers too, as their decimal text (``{"card": 4111111111111111}``). Masking
is a best effort on top of redaction by path, never a substitute for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any, Final

from aegis.crypto.jws import fold_name
from aegis.policy.decision import SanitizeObligation

__all__ = [
    "EMAIL_MASK",
    "REDACTED",
    "SECRET_MASK",
    "apply_to_body",
    "apply_to_headers",
    "as_read",
    "exponent_number_digits",
    "hidden_from_masks",
    "mask_text",
]

REDACTED: Final = "[REDACTED]"
EMAIL_MASK: Final = "[REDACTED:email]"
SECRET_MASK: Final = "[REDACTED:secret]"

#: Local part and domain labels are Unicode-aware (``\w``): ``jörg@example.com`` and
#: ``ann@exämple.com`` (RFC 6531, IDNA) are addresses as whole as ``ann@example.com``. A local
#: part may also be a quoted string (``"ann lee"@example.com``, RFC 5321 §4.1.2), and a domain an
#: address literal (``ann@[192.0.2.1]``, ``ann@[IPv6:2001:db8::1]``): mail is delivered to both.
_EMAIL: Final = re.compile(
    r"(?:\"(?:[^\"\\\r\n]|\\.){1,64}\"|[\w.%+!#$&'*=?^`{|}~/-]{1,64})"
    r"@(?:[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}|\[(?:IPv6:)?[0-9A-Fa-f:.]{2,45}\])"
)
#: Up to three separators between digits: a reader (or a person) takes ``4111  1111``,
#: ``4111\t1111``, ``4111 - 1111``, ``4111.1111``, ``4_111`` or a Unicode dash (U+2010-U+2015,
#: U+2212) as one card number as readily as ``4111 1111``.
#: A run of digit groups so joined, of any length: each span of whole groups holding 13 to 19
#: digits is tested (:func:`_mask_card`), so that a card next to other digits (``4111 1111
#: 1111 1111 12/27``, ``qty 1 4111…``) is found within its run.
_CARD: Final = re.compile(r"(?<![0-9])[0-9]+(?:[\s._\-\u2010-\u2015\u2212]{1,3}[0-9]+)*")
_DIGIT_GROUP: Final = re.compile(r"[0-9]+")
_SECRETS: Final = (
    re.compile(
        r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----.{0,10000}?-----END [A-Z ]{0,40}PRIVATE KEY-----",
        re.DOTALL,
    ),
    # Not \b, nor a lookbehind refusing "_": "ID_AKIA…" and "ID_sk-…" have no word boundary
    # before the key, which is still one.
    re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9])(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{16,128}"),
    re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[0-9A-Za-z]{36,255}"),
    re.compile(r"(?<![A-Za-z0-9])github_pat_[0-9A-Za-z_]{22,255}"),  # a fine-grained token
    re.compile(r"(?<![A-Za-z0-9])xox[abprs]-[0-9A-Za-z-]{10,200}"),
    # OpenAI (sk-…, sk-proj-…, sk-svcacct-…) and Anthropic (sk-ant-api03-…) keys: a run with a
    # digit in it, so that a slug such as "sk-learn-tutorial-page" is not taken for one.
    re.compile(r"(?<![0-9A-Za-z-])sk-(?=[A-Za-z_-]{0,512}[0-9])[0-9A-Za-z_-]{20,512}"),
    re.compile(r"(?<![0-9A-Za-z-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),  # Google API key
    # GitLab tokens: personal, deploy, runner, trigger, CI job, feed, incoming mail, OAuth …
    re.compile(
        r"(?<![0-9A-Za-z-])gl(?:pat|dt|rt|ptt|cbt|ft|imt|soat|oas|agent)-[0-9A-Za-z_-]{20,255}"
    ),
    re.compile(r"(?<![0-9A-Za-z-])hf_[0-9A-Za-z]{30,64}(?![0-9A-Za-z_-])"),  # Hugging Face
    re.compile(r"(?<![0-9A-Za-z-])npm_[0-9A-Za-z]{36}(?![0-9A-Za-z_-])"),  # npm
    re.compile(r"(?<![0-9A-Za-z-])pypi-AgE[0-9A-Za-z_-]{50,512}"),  # PyPI (a macaroon)
    re.compile(r"(?<![A-Za-z0-9])eyJ[0-9A-Za-z_-]{4,}\.eyJ[0-9A-Za-z_-]{4,}\.[0-9A-Za-z_-]{4,}"),
    re.compile(r"(?i)\bbearer\s{1,8}[0-9A-Za-z._~+/=-]{16,4096}"),
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _mask_card(m: re.Match[str]) -> str:
    """Each span of whole digit groups of the run holding 13 to 19 digits that passes the Luhn
    check is masked but for its last four digits. Each span is checked in constant time from
    prefix sums (a digit is doubled when its distance from the span's end is odd), so a long
    run of short groups costs a few operations per group."""
    text = m.group(0)
    where = [g.start() + k for g in _DIGIT_GROUP.finditer(text) for k in range(len(g.group()))]
    if len(where) < 13:
        return text
    digits = [ord(text[k]) - 48 for k in where]
    # plain[p][n], doubled[p][n]: sums over the first n digits at positions of parity p.
    plain = [[0], [0]]
    doubled = [[0], [0]]
    for i, d in enumerate(digits):
        for p in (0, 1):
            plain[p].append(plain[p][-1] + (d if i % 2 == p else 0))
            doubled[p].append(doubled[p][-1] + (_DOUBLED[d] if i % 2 == p else 0))
    ends = []  # digit index where each group ends
    count = 0
    for g in _DIGIT_GROUP.finditer(text):
        count += len(g.group())
        ends.append(count)
    starts = [0, *ends[:-1]]
    hidden = bytearray(len(where))
    for i, start in enumerate(starts):
        for j in range(i, len(ends)):
            end = ends[j]
            n = end - start
            if n > 19:
                break
            if n < 13:
                continue
            q = (end - 1) % 2
            total = plain[q][end] - plain[q][start] + doubled[1 - q][end] - doubled[1 - q][start]
            if total % 10 == 0:
                hidden[start : end - 4] = b"\x01" * (n - 4)
    if not any(hidden):
        return text
    out = list(text)
    for k, flag in zip(where, hidden, strict=True):
        if flag:
            out[k] = "*"
    return "".join(out)


#: Three base64url segments whose first may be a JWT header written with whitespace (``{ "alg"``
#: encodes as ``eyAi``, ``{\n`` as ``ew``): not ``eyJ``, so decoded to be sure (:func:`_jwt`).
_JWT_LIKE: Final = re.compile(
    r"(?<![0-9A-Za-z_-])(e[wy][0-9A-Za-z_-]{2,4096})\.[0-9A-Za-z_-]{4,}\.[0-9A-Za-z_-]{4,}"
)


def _jwt(m: re.Match[str]) -> str:
    """The mask for a :data:`_JWT_LIKE` match whose first segment decodes to a JSON object (a
    JWT header), else the match as it is."""
    header = m.group(1)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return m.group(0)
    return SECRET_MASK if isinstance(decoded, dict) else m.group(0)


def _mask_secrets(text: str) -> str:
    for pattern in _SECRETS:
        text = pattern.sub(SECRET_MASK, text)
    return _JWT_LIKE.sub(_jwt, text)


_MASKERS: Final[dict[str, Callable[[str], str]]] = {
    "email": lambda s: _EMAIL.sub(EMAIL_MASK, s),
    "card_number": lambda s: _CARD.sub(_mask_card, s),
    "secret": _mask_secrets,
}


def _mask_written(text: str, patterns: Iterable[str]) -> str:
    for name in patterns:
        text = _MASKERS[name](text)
    return text


def as_read(text: str) -> str:
    """``text`` as a lenient reader may take it: NFKC-normalised (fullwidth digits and at signs,
    circled ``⑪``, superscript ``¹`` become ASCII) and every other decimal digit (Arabic-Indic
    ``٤``, which NFKC keeps) as its ASCII digit, as Python's ``int()`` and many parsers read it."""
    if text.isascii():
        return text
    # Format characters (soft hyphen, zero-width space and joiners, word joiner, BOM) show as
    # nothing: ``4111\u200b1111…`` reads as one number.
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    return "".join(
        str(digit) if (digit := unicodedata.decimal(ch, None)) is not None else ch for ch in text
    )


def mask_text(text: str, patterns: Iterable[str]) -> str:
    """Mask every occurrence of the named built-in ``patterns`` in ``text``. What the masks
    find only in the text as read (:func:`as_read`: fullwidth digits or at signs) is
    masked too, and the text is then returned in that form: the client may read it so."""
    patterns = tuple(patterns)
    masked = _mask_written(text, patterns)
    read = as_read(masked)
    if read == masked:
        return masked
    again = _mask_written(read, patterns)
    return again if again != read else masked


def hidden_from_masks(text: str, patterns: Iterable[str]) -> bool:
    """Whether the masks find something in ``text`` as read (:func:`as_read`) that they do
    not find in it as written: for text that is masked as written, a reason to refuse it."""
    patterns = tuple(patterns)
    masked = _mask_written(text, patterns)
    read = as_read(masked)
    return read != masked and _mask_written(read, patterns) != read


def _decimal_texts(number: int | float) -> tuple[str, ...]:
    """A JSON number as readers print it: an integer in decimal digits; a whole float by its
    shortest digits, as JavaScript prints 4.1111111111111117e18 (``4111111111111111700``), and
    by its exact value, as C's ``%.0f`` and Python's ``int()`` do (``4111111111111111680``); any
    other float as it is written out."""
    if isinstance(number, int):
        return (str(number),)
    if number.is_integer():
        shortest = format(Decimal(repr(number)).to_integral_value(), "f")
        return tuple(dict.fromkeys((shortest, format(Decimal(number), "f"))))
    return (repr(number),)


#: A number written with an exponent, as a string may hold one: ``"4.111111111111111e15"`` is
#: a card number to a client that reads it with ``float()`` or ``Number()``.
_EXPONENT_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+")


def exponent_number_digits(token: str) -> tuple[str, ...]:
    """The whole numbers a reader may take a number with an exponent for (truncated or rounded),
    in decimal digits; none when ``token`` is not one or is too far from a card number's size
    (13 to 19 digits) to matter."""
    try:
        number = Decimal(token.strip())
    except InvalidOperation:
        return ()
    if not number.is_finite() or not 11 <= number.adjusted() <= 19:
        return ()
    read = [number.to_integral_value(ROUND_DOWN), number.to_integral_value()]
    read.append(Decimal(float(number)).to_integral_value())  # as float() reads it, exactly
    return tuple(dict.fromkeys(format(n, "f").lstrip("-") for n in read))


def _mask_string(value: str, patterns: tuple[str, ...]) -> str:
    """``value`` masked; a number written with an exponent is masked as the whole number it
    reads as (masks over ``4.111111111111111e15`` as written see no card number)."""
    read = as_read(value).strip()
    if _EXPONENT_NUMBER.fullmatch(read):  # as read: a fullwidth 4.1…e15 is one too
        for digits in exponent_number_digits(read):
            masked = mask_text(digits, patterns)
            if masked != digits:
                return masked
    return mask_text(value, patterns)


def _mask_values(value: Any, patterns: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return _mask_string(value, patterns)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # {"card": 4111111111111111} carries the card number as well as a string does; a match
        # turns the number into the masked text (a string: no number shows the mask).
        for text in _decimal_texts(value):
            masked = mask_text(text, patterns)
            if masked != text:
                return masked
        return value
    if isinstance(value, dict):
        # Keys too: {"bob@example.com": {...}} carries the address in the key. Two keys masked
        # to the same text keep the later value: hiding wins over keeping.
        return {mask_text(k, patterns): _mask_values(v, patterns) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_values(v, patterns) for v in value]
    return value


def _redact(value: Any, keys: list[str]) -> Any:
    if not keys:
        return REDACTED
    if isinstance(value, list):  # a path walks through lists element by element
        if keys[0] != "*":
            return [_redact(v, keys) for v in value]
        walked = []
        for v in value:
            v = _redact(v, keys[1:])  # the '*' read as the element's index
            if isinstance(v, dict):
                # ... and as a key of the element, the list walked through as any other:
                # data.*.ssn hides {"data": [{"attributes": {"ssn": …}}]} as it hides
                # {"data": {"x": {"ssn": …}}} (hiding more is the safe side).
                v = _redact(v, keys)
            walked.append(v)
        return walked
    if isinstance(value, str):
        return _redact_encoded(value, keys)
    if not isinstance(value, dict):
        return value
    # Member names match case-insensitively: Go's encoding/json and ASP.NET read {"SSN": …} as
    # the member ssn, so a redaction of ssn must hide it too (hiding more is the safe side). A
    # dotted name is a path to Elasticsearch-style readers: {"customer.ssn": …} is customer.ssn,
    # and {"ssn.last4": …} under customer lies inside it.
    folded = ["*" if key == "*" else fold_name(key) for key in keys]
    out = {}
    for k, v in value.items():
        parts = [fold_name(part) for part in k.split(".")]
        if not all(key in ("*", part) for key, part in zip(folded, parts, strict=False)):
            out[k] = v
        elif len(parts) >= len(keys):
            out[k] = REDACTED
        else:
            out[k] = _redact(v, keys[len(parts) :])
    return out


def _redact_encoded(value: str, keys: list[str]) -> str:
    """A string on a redacted path that holds a JSON document (double-encoded JSON, which many
    APIs send: ``{"customer": "{\\"ssn\\": …}"}``) is read as a client parsing it reads it:
    redacted inside, and written back as JSON; any other string stays as it is."""
    if not value.lstrip().startswith(("{", "[")):
        return value
    try:
        inner = json.loads(value)
    except ValueError:
        return value
    if not isinstance(inner, dict | list):
        return value
    redacted = _redact(inner, keys)
    return value if redacted == inner else json.dumps(redacted, ensure_ascii=False)


def _for(
    obligations: Iterable[SanitizeObligation], target: str, kind: str
) -> list[SanitizeObligation]:
    return [o for o in obligations if o.target == target and o.kind == kind]


def apply_to_body(body: Any, obligations: Iterable[SanitizeObligation], target: str) -> Any:
    """A sanitized copy of a JSON ``body`` for ``target`` (``request`` or ``response``).

    Redactions run first (the value becomes ``"[REDACTED]"``; ``*`` matches any key, names match
    case-insensitively, and lists are walked element by element), then masks over every string
    value and key that remains, and every number read as its decimal text (a number a mask
    matches becomes the masked string).
    """
    obligations = list(obligations)
    for o in _for(obligations, target, "redact"):
        assert o.path is not None
        body = _redact(body, o.path.split("."))
    patterns = tuple(sorted({o.pattern for o in _for(obligations, target, "mask") if o.pattern}))
    return _mask_values(body, patterns) if patterns else body


def apply_to_headers(
    headers: Mapping[str, str], obligations: Iterable[SanitizeObligation], target: str
) -> dict[str, str]:
    """A copy of ``headers`` without the dropped ones and with masks applied to the remaining
    values. Names compare case-insensitively and with ``_`` read as ``-``: CGI and WSGI servers
    read ``X_Internal_Override`` as the same variable as ``X-Internal-Override``."""
    obligations = list(obligations)
    drop = {
        o.header.lower().replace("_", "-")
        for o in _for(obligations, target, "drop_header")
        if o.header
    }
    patterns = tuple(sorted({o.pattern for o in _for(obligations, target, "mask") if o.pattern}))
    return {
        k: mask_text(v, patterns) if patterns else v
        for k, v in headers.items()
        if k.lower().replace("_", "-") not in drop
    }
