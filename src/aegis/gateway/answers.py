"""Sanitized answers: what an upstream's answer keeps under response obligations, and whether
masks over it see what the client will read.

A decision may redact JSON members and mask patterns (card numbers, addresses, keys) in the
answer. Masks rewrite text as written; a client may read more in it: escapes it decodes (``\\u0034``,
``%34``, ``&#52;``), other Unicode digits, numbers with exponents, a charset declared in the body.
Every such answer is refused (502) unless the masks see in it all the client will: an answer that
cannot be sanitized is never passed on unsanitized. Answers are sanitized whole: no ranges, no
content coding, no validator or digest of the unsanitized body."""

from __future__ import annotations

import codecs
import html
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final
from urllib.parse import unquote

from aegis.errors import InvalidRequest
from aegis.gateway.fields import is_json_type, parse_json_body, utf8_labelled
from aegis.gateway.pipeline import Result
from aegis.policy.obligations import (
    apply_to_body,
    as_read,
    exponent_number_digits,
    hidden_from_masks,
    mask_text,
)

__all__ = [
    "EVENT_STREAM",
    "SANITIZED_REQUEST_DROP",
    "SANITIZED_REQUEST_REFUSE",
    "SANITIZE_INLINE",
    "EventCut",
    "answer_obligations",
    "mask_patterns",
    "maskable_field",
    "media_type",
    "response_rules",
    "sanitized_body",
    "sanitized_fields",
    "vet_answer",
]


#: Request fields dropped when the answer is to be sanitized. Those that ask for a part of the
#: answer (``Request-Range`` is Range to older servers): a part holds no ``customer.ssn`` to
#: redact, and a card number split over two parts is never masked. And ``If-None-Match``: the
#: caller never sees the upstream's entity tag, and a 304 or a 200 would tell it whether a
#: guessed one, computed over a guess of the unsanitized body, is right.
SANITIZED_REQUEST_DROP: Final = frozenset({"range", "if-range", "request-range", "if-none-match"})
#: Request preconditions refused when the answer is to be sanitized: a 412 or a 2xx would tell
#: the caller whether a guessed entity tag (or date) of the unsanitized body is right, as
#: ``If-None-Match`` would. Unlike it they guard writes: dropped, a conditional write would be
#: made unconditionally, so the call is refused instead.
SANITIZED_REQUEST_REFUSE: Final = frozenset({"if-match", "if-unmodified-since"})
#: Fields of the upstream's answer that no sanitized answer keeps: it is sent whole, in no
#: content coding, and the gateway serves no ranges of it. Nor does it keep a validator or a
#: digest computed over the unsanitized body (Express's ETag is a SHA-1 of it): the caller knows
#: all of it but what was redacted or masked, and could try every ssn until one matches.
_SANITIZED_DROP: Final = frozenset(
    {"content-encoding", "accept-ranges", "etag", "content-md5", "digest", "repr-digest"}
    | {"content-digest", "x-goog-hash", "x-ms-content-md5", "x-ms-content-crc64"}
)
#: Object stores name a body's checksum in their own ways (``x-amz-checksum-sha256``,
#: ``x-bz-content-sha1``, ``x-oss-hash-crc64ecma``, ``x-ms-blob-content-md5`` …): any field whose
#: name holds one of these words is taken for one and dropped too. So is one that gives the
#: unsanitized body's length (``X-Original-Content-Length``, ``x-goog-stored-content-length``,
#: ``X-Body-Size``): set against the sanitized answer, it tells how long a redacted value was.
#: The gateway sets the ``Content-Length`` of what it sends itself.
_SANITIZED_DROP_WORDS: Final = (
    *("md5", "sha1", "sha-1", "sha256", "sha-256", "sha512", "crc"),
    *("hash", "digest", "checksum", "length", "size"),
)


def response_rules(result: Result) -> bool:
    """Whether the answer is read whole and rewritten: obligations on its body, or the tools
    an MCP ``tools/list`` answer names (``Result.listed``)."""
    return result.listed is not None or any(
        o.target == "response" and o.kind != "drop_header" for o in result.obligations
    )


def answer_obligations(result: Result) -> bool:
    """Whether the decision's obligations rewrite the answer's body (masks, redactions)."""
    return any(o.target == "response" and o.kind != "drop_header" for o in result.obligations)


def mask_patterns(result: Result, target: str = "response") -> tuple[str, ...]:
    """The patterns the decision masks in the answer (or the request)."""
    return tuple(
        o.pattern
        for o in result.obligations
        if o.target == target and o.kind == "mask"
        if o.pattern
    )


#: Why text masked as written is refused when its Unicode forms hide what the masks look for.
_HIDDEN_FROM_MASKS: Final = (
    "a text answer to mask must write what the masks look for in ASCII (it holds a card "
    "number, address or key in fullwidth, circled or other Unicode forms a client reads as ASCII)"
)


def media_type(content_type: str) -> str:
    """``type/subtype`` of a ``Content-Type`` value, lowercased, without parameters."""
    return content_type.partition(";")[0].strip().lower()


def sanitized_fields(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The answer fields a sanitized answer keeps (see :data:`_SANITIZED_DROP`)."""
    return [
        (k, v)
        for k, v in headers
        if k not in _SANITIZED_DROP and not any(word in k for word in _SANITIZED_DROP_WORDS)
    ]


def vet_answer(content_types: Sequence[str], encoding: str, result: Result) -> None:
    """Raise ``InvalidRequest`` (why, for the 502) for a whole answer its obligations cannot
    be applied to: two ``Content-Type`` fields, a content coding, a media type that is neither
    JSON nor text, or text under a redaction."""
    if len(content_types) > 1:
        # Read here by the first; a client may join them and take the last charset.
        raise InvalidRequest("it has more than one Content-Type field")
    if encoding != "identity":
        raise InvalidRequest(
            "it is content-coded, though the gateway asked the upstream for an uncoded "
            "answer (it sends no Accept-Encoding when the answer is sanitized)"
        )
    ctype = content_types[0] if content_types else None
    as_json = is_json_type(ctype)
    media = media_type(ctype or "")
    if media and not as_json and not _is_text(media):
        raise InvalidRequest(
            f"a {media[:64]} answer cannot be sanitized, only JSON and text: leave this "
            "path out of the sanitize rule (match it by path or method)"
        )
    if not as_json and any(
        o.target == "response" and o.kind == "redact" for o in result.obligations
    ):
        # A redaction names JSON members; in text (JSON labelled text/plain included) it would
        # find nothing and pass the answer on whole.
        raise InvalidRequest("a redaction applies only to a JSON answer")


#: An escape the client may decode and a mask over the text does not: ``\u0034``, ``\u{34}``,
#: ``\U00000034``, ``\x34``, octal ``\064`` (JSON, JavaScript, Python, C); ``%34``, ``%u0034``
#: (URL encoding); an HTML character reference, numeric (``&#52;``, ``&#x34``: the ``;`` is
#: optional) or named (``&commat;`` is ``@``; HTML reads the legacy ``&sup1``, ``&frac12`` …
#: without the ``;`` too). Not only digits: ``ann\u0040example.com`` hides an address,
#: ``AKIA\u0049…`` a key.
_ESCAPE: Final = re.compile(
    r"\\(?:[uUxX][0-9A-Fa-f{]|[0-7])|%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})"
    r"|&(?:#[0-9xX]|[A-Za-z][A-Za-z0-9]*;|sup[123]|frac[0-9]{2})"
)
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")
#: Backslash escapes a client may decode (JSON, JavaScript, Python, C) and ``%uXXXX``.
_BACKSLASH_ESCAPE: Final = re.compile(
    r"\\u\{0*([0-9A-Fa-f]{1,6})\}|\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})"
    r"|\\[xX]([0-9A-Fa-f]{2})|\\([0-7]{1,3})|%[uU]([0-9A-Fa-f]{4})"
)
#: A CSS escape: one to six hex digits, then one optional white space (``\\34 111`` is ``4111``).
_CSS_ESCAPE: Final = re.compile(r"\\([0-9A-Fa-f]{1,6})[ \t\n\r\f]?")
#: Most readings of one text the decoding check masks, all layers together (each is one pass of
#: the masks over text as long as the answer); past it the text is refused.
_MAX_READINGS: Final = 12


def _code_point(digits: str, base: int, written: str) -> str:
    code = int(digits, base)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else written


def _readings(text: str) -> set[str]:
    """The texts a client may read ``text`` as once it decodes one layer of escapes: backslash
    escapes as JSON, JavaScript and C read them or as CSS does (``\\34 `` is ``4``, not octal),
    then HTML references as browsers read them (legacy names without ``;`` too), then
    percent-encoding as UTF-8 or as Latin-1 bytes, each with ``+`` kept or read as a space (a
    query string or cookie value is form-decoded). ``text`` itself is left out."""

    def backslash(m: re.Match[str]) -> str:
        digits, base = next((g, 8 if i == 4 else 16) for i, g in enumerate(m.groups()) if g)
        return _code_point(digits, base, m.group(0))

    out: set[str] = set()
    for form in {text, text.replace("+", " ")}:
        for unescaped in {
            _BACKSLASH_ESCAPE.sub(backslash, form),
            _CSS_ESCAPE.sub(lambda m: _code_point(m.group(1), 16, m.group(0)), form),
        }:
            referenced = html.unescape(unescaped)
            out.add(unquote(referenced, errors="replace"))
            out.add(unquote(referenced, encoding="latin-1"))
    out.discard(text)
    return out


#: Markup a reader of HTML or XML does not show: a tag (``<span>``, ``<wbr>``) or a comment.
_MARKUP: Final = re.compile(r"<!--.*?(?:-->|\Z)|<[A-Za-z/!?][^<>]*>", re.DOTALL)
#: A Markdown (CommonMark) backslash escape of ASCII punctuation: ``ann\@example.com``.
_MARKDOWN_ESCAPE: Final = re.compile(r"\\([!-/:-@\[-`{-~])")
#: Quoted-printable (vCard 2.1, MIME parts): ``=40`` is ``@``, ``=`` at a line's end joins it.
_QUOTED_PRINTABLE: Final = re.compile(r"=([0-9A-Fa-f]{2})|=\r?\n")


def _renderings(text: str) -> list[str]:
    """What readers of markup show of ``text`` besides it: HTML or XML with its tags and
    comments gone (read as nothing or as a space), Markdown with its backslash escapes read,
    quoted-printable decoded."""
    out = []
    if "<" in text:
        out += [_MARKUP.sub(gap, text) for gap in ("", " ")]
    if "\\" in text:
        out.append(_MARKDOWN_ESCAPE.sub(r"\1", text))
    if "=" in text:
        out.append(
            _QUOTED_PRINTABLE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else "", text)
        )
    return [r for r in out if r != text]


def _revealed_by_rendering(text: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``text`` read as markup (:func:`_renderings`) shows something the masks find
    that they do not find in it as written: ``<span>4111</span> <span>1111</span> …``,
    ``<b>ann</b>@example.com``, ``ann\\@example.com``, ``ann=40example.com``. What they find as
    written is masked first, so markup around an already masked card does not count."""
    if not any(c in text for c in "<\\="):
        return False
    masked = mask_text(text, patterns)
    return any(mask_text(r, patterns) != r for r in _renderings(masked))


def _revealed_by_decoding(text: str, patterns: tuple[str, ...]) -> bool:
    """Whether decoding the escapes in ``text`` (every reading of :func:`_readings`, up to three
    layers: ``%2534`` is ``%34`` is ``4``) shows the masks something they do not find in it as
    written. What they find as written is masked first, so an ordinary ``%20`` in a URL or
    ``&amp;`` in HTML next to a masked card does not count: only what the escapes hid. An
    escape no reading decodes, more than three layers, or more than :data:`_MAX_READINGS`
    readings in all, refuse it: the client may know a decoding the check does not, and the
    check's cost stays a bounded number of passes over the text."""
    if not any(c in text for c in "\\%&+"):
        return False
    current = {mask_text(text, patterns)}
    masked = 0
    for _ in range(3):
        following: set[str] = set()
        for seen in current:
            for reading in _readings(seen) - following:
                masked += 1
                if masked > _MAX_READINGS or mask_text(reading, patterns) != reading:
                    return True
                following.add(reading)
        if not following:
            return any(_ESCAPE.search(seen) for seen in current)
        current = following
    return any(_ESCAPE.search(seen) for seen in current)  # still escaped after three layers


#: A number with an exponent, not inside a word: JSON labelled text/plain or NDJSON, read by the
#: client as JSON, holds ``4.111111111111111E15`` as a card number the masks over text miss.
_EXPONENT_TOKEN: Final = re.compile(
    r"(?<![0-9A-Za-z_.])(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+"
)
#: A C0 control character other than TAB, LF and CR (ESC among them).
_C0_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
#: A charset declared in an HTML or XML body (``<meta charset="iso-2022-jp">``, ``<meta
#: http-equiv … content="text/html; charset=…">``, ``<?xml … encoding="…"?>``): an unlabelled
#: answer is decoded by it.
_DECLARED_CHARSET: Final = re.compile(
    r"""(?i)<meta\b[^>]*?charset\s*=\s*["']?\s*([^\s"'>;/]*)"""
    r"""|<\?xml\b[^>]*?encoding\s*=\s*["']?\s*([^\s"'>?]*)"""
)
#: A form answer reads ``+`` as a space: ``4111+1111+1111+1111`` is a card number to the client.
_FORM: Final = "application/x-www-form-urlencoded"


#: Answers to sanitize larger than this are sanitized on a worker thread.
SANITIZE_INLINE: Final = 16 * 1024


def sanitized_body(raw: bytes, ctype: str | None, as_json: bool, result: Result) -> Any:
    """The answer's body with the decision's response obligations applied; ``InvalidRequest``
    (or ``RecursionError``, ``UnicodeDecodeError``) when it cannot be sanitized."""
    if result.listed is not None and not as_json and media_type(ctype or "") != EVENT_STREAM:
        # MCP clients read other application/json* types as JSON: cut as neither, they would
        # pass whole.
        raise InvalidRequest(
            "an answer to tools/list must be JSON (application/json) or an event stream "
            "(text/event-stream)"
        )
    if as_json:
        try:
            body: Any = parse_json_body(raw, ctype, fold_case=False)
        except InvalidRequest:
            raise InvalidRequest(
                "it is not JSON that reads one way (UTF-8, no member repeated)"
            ) from None
    else:
        body = _maskable_text(raw, ctype, mask_patterns(result))
    clean = apply_to_body(body, result.obligations, "response")
    if result.listed is not None:
        clean = _listed_message(clean, result.listed) if as_json else _listed_events(
            str(clean), result.listed
        )  # fmt: skip
    patterns = mask_patterns(result)
    if as_json and patterns and (hidden := _hidden_in_json(clean, patterns)) is not None:
        raise InvalidRequest(hidden)
    return clean


def _listed_message(message: Any, listed: Callable[[Any], bool]) -> Any:
    """A JSON-RPC message (or batch) with each ``result.tools`` list kept to the tools
    ``listed`` admits (an entry that is not an object naming a tool is left out)."""
    if isinstance(message, list):
        return [_listed_message(m, listed) for m in message]
    if isinstance(message, dict):
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            tools = [t for t in result["tools"] if isinstance(t, dict) and listed(t.get("name"))]
            return {**message, "result": {**result, "tools": tools}}
    return message


EVENT_STREAM: Final = "text/event-stream"
#: Server-sent events end lines with CRLF, LF or CR (WHATWG HTML §9.2.5); each ends the same.
_EVENT_LINE_END: Final = re.compile(r"\r\n|\r|\n")


def _listed_events(text: str, listed: Callable[[Any], bool]) -> str:
    """A whole event stream with :func:`_listed_message` applied to each event's data that is
    JSON (:class:`EventCut`, fed at once)."""
    return EventCut(listed, len(text) + 1).feed(text.encode(), final=True)


class EventCut:
    """An event stream with :func:`_listed_message` applied to each event's data that is JSON,
    as it passes: each complete event is cut and given back at once, so a server's request to
    the client on the stream (``roots/list``, a sampling request) reaches it before the stream
    ends, a comment between events (a keep-alive) passes at once, and a stream that never ends
    (the GET stream) is cut all the same. Lines are given back ended with LF, which a reader
    reads as it read CR or CRLF; an event whose data is rewritten carries it on one ``data:``
    line where its first was. Each byte is read once, however the stream is split (a CR at the
    end of a read may be the first half of a CRLF: an LF after it is its pair).

    ``InvalidRequest`` (the stream cannot be cut as its client reads it): one event growing
    past ``limit`` characters; data that is JSON only to a lenient reader (a member repeated),
    or nested too deeply; a stream starting with a byte-order mark, which WHATWG readers drop
    and the MCP SDK's takes into the first field's name (``\ufeffdata`` is no ``data``)."""

    def __init__(self, listed: Callable[[Any], bool], limit: int) -> None:
        self._listed, self._limit = listed, limit
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._parts: list[str] = []  # the line not yet ended, in the pieces it came in
        self._pending = 0  # its length
        self._skip_lf = False  # a CR ended the last line: an LF first in the next read pairs it
        self._block: list[str] = []  # the lines of the event not yet ended
        self._size = 0
        self._started = False

    def feed(self, data: bytes, *, final: bool = False) -> str:
        text = self._decoder.decode(data, final)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                raise InvalidRequest(
                    "it starts with a byte-order mark, which some event-stream readers drop "
                    "and others read into the first field's name"
                )
        out: list[str] = []
        pos = 0
        if self._skip_lf and text:
            pos, self._skip_lf = (1 if text.startswith("\n") else 0), False
        for end in _EVENT_LINE_END.finditer(text, pos):
            line = "".join((*self._parts, text[pos : end.start()]))
            self._parts, self._pending, pos = [], 0, end.end()
            self._line(line, out)
        if pos == len(text) and text.endswith("\r"):
            self._skip_lf = True
        if pos < len(text):
            self._parts.append(text[pos:])
            self._pending += len(text) - pos
        if self._size + self._pending > self._limit:
            raise InvalidRequest(f"an event of the stream is longer than {self._limit} characters")
        if final:  # an unended event, which readers drop, as it came
            out.extend(f"{line}\n" for line in self._block)
            out.extend(self._parts)
            self._block, self._parts, self._size, self._pending = [], [], 0, 0
        return "".join(out)

    def _line(self, line: str, out: list[str]) -> None:
        if line and not self._block and line.startswith(":"):
            out.append(f"{line}\n")  # a comment between events: nothing to cut
        elif line:
            self._block.append(line)
            self._size += len(line)
        else:
            out.extend(f"{kept}\n" for kept in _listed_event(self._block, self._listed))
            out.append("\n")
            self._block, self._size = [], 0


def _listed_event(block: list[str], listed: Callable[[Any], bool]) -> list[str]:
    """One complete event's lines, its data kept to the tools ``listed`` admits."""
    data, first = [], None
    for i, line in enumerate(block):
        name, colon, value = line.partition(":")
        if name == "data":
            first = i if first is None else first
            data.append(value[1:] if colon and value.startswith(" ") else value)
    if first is None:
        return block
    raw = "\n".join(data)
    try:
        message = parse_json_body(raw.encode("utf-8"), "application/json", fold_case=False)
    except InvalidRequest:
        try:
            json.loads(raw)
        except ValueError:
            return block  # no reader takes it for a message
        except RecursionError:
            raise InvalidRequest("an event's data is JSON nested too deeply") from None
        raise InvalidRequest(
            "an event's data is not JSON that reads one way (UTF-8, no member repeated)"
        ) from None
    except RecursionError:
        raise InvalidRequest("an event's data is JSON nested too deeply") from None
    kept = _listed_message(message, listed)
    if kept == message:
        return block
    rest = [line for line in block if line.partition(":")[0] != "data"]
    return [*rest[:first], "data: " + json.dumps(kept), *rest[first:]]


#: Media types read as text besides ``text/*`` and the JSON types.
_TEXT_TYPES: Final = frozenset(
    {"application/xml", "application/javascript", "application/ecmascript", "application/yaml",
     "application/x-yaml", "application/csv", "application/x-ndjson", "application/jsonl",
     "application/json-seq", "application/graphql", "application/sql", "application/x-sh"}
)  # fmt: skip


def _is_text(media: str) -> bool:
    """Whether a media type (``type/subtype``, lowercase) holds text a mask can read; other
    answers (PDF, images, archives) are refused under sanitize with a message naming the type.
    A form, a multipart or a message answer counts as text here and is refused by
    :func:`_maskable_text` with its own reason."""
    top, _, sub = media.partition("/")
    return (
        top in ("text", "multipart", "message")
        or media in _TEXT_TYPES
        or media == _FORM
        or sub.endswith(("+xml", "+json", "+yaml"))
        or "json" in sub
    )


def _maskable_text(raw: bytes, content_type: str | None, patterns: tuple[str, ...]) -> str:
    """A text answer as the client will read it, for masks to rewrite; ``InvalidRequest`` when
    the masks could not see what the client reads: a charset other than UTF-8 (UTF-16 text of
    ASCII is valid UTF-8 holding NULs), text :func:`_hidden_from_masks` refuses, or a form
    (``application/x-www-form-urlencoded``). Under masks, so is a ``multipart/*`` or
    ``message/*`` answer: each part names its own transfer encoding and charset. Only JSON
    answers are parsed, their escapes decoded before masking; any other text is masked as it is
    written."""
    media = media_type(content_type or "")
    if media == _FORM:
        raise InvalidRequest("a form answer cannot be masked: its '+' and '%XX' decode")
    if patterns and media.partition("/")[0] in ("multipart", "message"):
        # Each part names its own charset and Content-Transfer-Encoding: as quoted-printable,
        # base64 or UTF-7 a part hides a card number the masks over the whole never see.
        raise InvalidRequest(
            "a multipart or message answer cannot be masked: its parts decode on their own"
        )
    if not utf8_labelled(content_type):
        raise InvalidRequest("a text answer to mask must be UTF-8")
    text = raw.decode("utf-8")
    if patterns and _C0_CONTROL.search(text):
        # ESC switches an ISO-2022 reader to another character set (fullwidth digits in bytes
        # the masks read as ASCII punctuation); no text the masks read holds other controls.
        raise InvalidRequest(
            "a text answer to mask must hold no control character but TAB, CR and LF"
        )
    if patterns and any(
        (m.group(1) or m.group(2) or "").lower() not in ("utf-8", "utf8", "us-ascii", "ascii")
        for m in _DECLARED_CHARSET.finditer(text)
    ):
        raise InvalidRequest(
            "a text answer to mask must declare no charset but UTF-8 in its body "
            "(<meta charset>, <?xml encoding>): a client decodes by it"
        )
    # Without masks (a tool list to cut, say) nothing is looked for in the text as written.
    if patterns and (why := _hidden_from_masks(text, patterns)) is not None:
        raise InvalidRequest(why)
    return text


def _hidden_from_masks(text: str, patterns: tuple[str, ...]) -> str | None:
    """Why masks over ``text`` as written could miss what a client reads in it, or ``None``: a
    NUL, an escape (:data:`_ESCAPE`), a digit other than ASCII 0-9 (fullwidth, Arabic-Indic,
    superscript: the client may read it as one), a number of card size written with an exponent
    (``4.111111111111111E15`` in JSON not labelled JSON: the client reads it as JSON, the masks
    see no card number), or anything the masks find only in its NFKC form (a fullwidth at
    sign, circled numbers)."""
    if "\x00" in text:
        return "a text answer to mask must hold no NUL"
    if _revealed_by_decoding(text, patterns):
        return (
            "a text answer to mask holds an escape (\\u, \\x, %XX, &#, &name;) that decodes "
            "to what the masks look for"
        )
    if _revealed_by_rendering(text, patterns):
        return (
            "a text answer to mask holds markup (a tag, a comment, a Markdown or quoted-printable "
            "escape) inside what the masks look for: rendered, it shows it whole"
        )
    if not text.isascii() and any(ch.isdigit() for ch in _NON_ASCII.findall(text)):
        return "a text answer to mask must write its digits as ASCII 0-9"
    if any(exponent_number_digits(m.group(0)) for m in _EXPONENT_TOKEN.finditer(text)):
        return "a text answer to mask must write no number of 13 to 19 digits with an exponent"
    if hidden_from_masks(text, patterns):
        return _HIDDEN_FROM_MASKS
    return None


def hidden_from_request_masks(
    result: Result, headers: Iterable[tuple[str, str]], body: Any
) -> str | None:
    """Why request masks could miss what the upstream reads, or ``None``: the checks answers get
    (:func:`_hidden_in_json`, :func:`maskable_field`), over the forwarded body (already masked)
    and header values. An upstream decodes ``%34``, a form's ``+`` in a cookie or a Referer
    query, ``&#52;`` in a string, as a client would in an answer."""
    patterns = mask_patterns(result, "request")
    if not patterns:
        return None
    if body is not None and (why := _hidden_in_json(body, patterns)) is not None:
        return why
    for name, value in headers:
        if not maskable_field(value, patterns):
            return (
                f"the {name[:64]} header writes what the masks look for in an encoded form the "
                "upstream may decode (%XX, +, an HTML reference, Unicode look-alikes)"
            )
    return None


def maskable_field(value: str, patterns: tuple[str, ...]) -> bool:
    """Whether masks over an answer field's value (its bytes as Latin-1) see what the client
    reads: the text tests of :func:`_hidden_from_masks`, over the bytes read as Latin-1 and as
    UTF-8 both (a fullwidth digit is three bytes); a ``Location`` query or a cookie value
    decodes ``%34`` and ``+`` (:func:`_readings`) as the masks do not."""
    readings = [value, value.encode("latin-1").decode("utf-8", "replace")]
    return all(_hidden_from_masks(text, patterns) is None for text in readings)


def _hidden_in_json(clean: Any, patterns: tuple[str, ...]) -> str | None:
    """Why masks over a JSON answer's strings (``clean``, already masked) could miss what a
    client reads in one, or ``None``. The parser decodes JSON's own escapes only; a client may
    decode more in a string or member name: an HTML reference (``"<p>&#52;111 …</p>"``), ``%34``,
    a doubled ``\\u0034``, a form's ``+`` (``4111+1111+1111+1111``), or read a number with an
    exponent inside longer text (``"card 4.111111111111111e15"``, fullwidth digits too)."""
    stack = [clean]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and (why := _hidden_in_string(value, patterns)) is not None:
            return why
    return None


def _hidden_in_string(text: str, patterns: tuple[str, ...]) -> str | None:
    """The tests of :func:`_hidden_from_masks` for one masked JSON string: escapes and NULs
    refuse it; a card-size number with an exponent, or digits joined by ``+`` read as spaces,
    refuse it only where the masks would change what it reads as (JSON strings are read in
    their NFKC form, so other Unicode digits are masked, not refused)."""
    if "\x00" in text:
        return "a JSON answer to mask must hold no NUL in a string"
    if _revealed_by_decoding(text, patterns):
        return (
            "a JSON answer to mask holds a string with an escape (\\u, \\x, %XX, &#, "
            "&name;) that decodes to what the masks look for"
        )
    if _revealed_by_rendering(text, patterns):
        return (
            "a JSON answer to mask holds a string with markup (a tag, a comment, a Markdown or "
            "quoted-printable escape) inside what the masks look for: rendered, it shows it whole"
        )
    for token in _EXPONENT_TOKEN.finditer(as_read(text)):
        if any(mask_text(d, patterns) != d for d in exponent_number_digits(token.group(0))):
            return "a JSON answer to mask must write no card number with an exponent in a string"
    return None
