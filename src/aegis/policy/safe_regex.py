"""An RE2-safe regular-expression subset, rendered identically for Python ``re`` and Rust regex.

Rego's ``regex.match`` uses RE2/Rust-regex semantics (linear time, no backtracking); the in-process
evaluator uses Python's backtracking ``re``. A pattern is therefore parsed here into a small syntax
tree, checked, and rendered twice so that both engines accept the same strings:

* supported: literals, ``.``, classes ``[a-z0-9_]`` / ``[^...]``, ``\\d \\w \\s`` (and negations,
  ASCII-only in both engines), escaped metacharacters, ``\\t \\n \\r``, anchors ``^`` and ``$``
  (start and end of the whole string, never of a line), groups ``(...)`` and ``(?:...)``,
  alternation ``|``, and the quantifiers ``* + ? {n} {n,} {n,m}`` (greedy or lazy);
* refused at load, because they can backtrack catastrophically or mean different things in the two
  engines: backreferences, lookaround, inline flags, atomic groups, possessive quantifiers, a
  quantifier applied to anything that already contains a variable-width quantifier (``(a+)+``;
  a fixed count such as ``(-[0-9]{4}){0,3}`` is fine), a quantifier
  applied to a group with alternation (``(a|aa)*``), more than :data:`MAX_VARIABLE_REPEATS`
  variable-width repeats, bounds above :data:`MAX_REPEAT`, and patterns over
  :data:`MAX_PATTERN_LENGTH` characters.

Matching is a search (unanchored unless the pattern uses ``^``/``$``), as in Rego, and is done by
RE2 (google-re2) on the RE2 rendering: the subset's rules keep the two engines' languages equal,
but they do not bound a backtracking engine's work (``a*a*a*b`` over 4,096 characters takes a
minute in Python's ``re``, microseconds in RE2). Subjects longer than :data:`MAX_SUBJECT_LENGTH`
characters are a policy error in both engines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import re2  # type: ignore[import-untyped]  # google-re2: RE2's own linear-time matcher

__all__ = [
    "MAX_PATTERN_LENGTH",
    "MAX_REPEAT",
    "MAX_SUBJECT_LENGTH",
    "MAX_VARIABLE_REPEATS",
    "RegexRejected",
    "SafeRegex",
    "compile_safe",
    "glob_to_regex",
]

#: RE2 reports a pattern it refuses through its own logger (stderr); the error is ours to report.
_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False
MAX_PATTERN_LENGTH: Final = 512
MAX_REPEAT: Final = 1000
MAX_VARIABLE_REPEATS: Final = 3
MAX_SUBJECT_LENGTH: Final = 4096

_META: Final = frozenset("\\.^$*+?()[]{}|")
_CLASS_META: Final = frozenset("\\]^-[&~")
_SHORTHAND: Final = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\x0B\\x0C\\r\\x20"}
_CONTROL_ESCAPES: Final = {"t": "\t", "n": "\n", "r": "\r", "f": "\x0c", "v": "\x0b"}


class RegexRejected(ValueError):
    """The pattern is outside the safe subset; the message says what to change."""


@dataclass(frozen=True, slots=True)
class SafeRegex:
    """A checked pattern: the source, its Rust/RE2 form (for Rego), a compiled Python form and,
    for ``regex`` conditions, that RE2 form compiled by RE2 itself (``linear``), which is what
    matches: linear in the subject whatever the pattern, as in Rego."""

    source: str
    rust: str
    python: re.Pattern[str]
    linear: Any = None

    def search(self, subject: str) -> bool:
        engine = self.linear if self.linear is not None else self.python
        return engine.search(subject) is not None


def _char(c: str, in_class: bool) -> str:
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02X}"
    if c in (_CLASS_META if in_class else _META) or (not in_class and c in "#&~-"):
        return "\\" + c
    return c


class _Parser:
    """Recursive descent over the subset; produces the same text for both engines."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.i = 0
        self.variable_repeats = 0
        self.groups = 0

    def fail(self, what: str) -> RegexRejected:
        return RegexRejected(f"regex {self.src!r} at offset {self.i}: {what}")

    def peek(self) -> str | None:
        return self.src[self.i] if self.i < len(self.src) else None

    # Each parse method returns (rust_text, python_text, has_variable_repeat, has_alternation).
    # A fixed count such as {4} never creates a choice, so it may sit inside another repeat.
    def alternation(self) -> tuple[str, str, bool, bool]:
        parts = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.concat())
        rust = "|".join(p[0] for p in parts)
        py = "|".join(p[1] for p in parts)
        return rust, py, any(p[2] for p in parts), len(parts) > 1 or any(p[3] for p in parts)

    def concat(self) -> tuple[str, str, bool, bool]:
        rust, py, quant, alt = [], [], False, False
        while self.peek() not in (None, "|", ")"):
            r, p, q, a = self.repeat()
            rust.append(r)
            py.append(p)
            quant, alt = quant or q, alt or a
        return "".join(rust), "".join(py), quant, alt

    def repeat(self) -> tuple[str, str, bool, bool]:
        rust, py, quant, alt = self.atom()
        suffix = self.quantifier()
        if suffix is None:
            return rust, py, quant, alt
        text, variable = suffix
        if quant:
            raise self.fail("nested quantifiers can backtrack catastrophically; flatten them")
        if alt:
            raise self.fail("a quantified group with '|' can backtrack; use a character class")
        if rust in ("", "(?:)", "()"):
            raise self.fail("nothing to repeat")
        if variable:
            self.variable_repeats += 1
            if self.variable_repeats > MAX_VARIABLE_REPEATS:
                raise self.fail(
                    f"more than {MAX_VARIABLE_REPEATS} variable-width repeats; simplify the pattern"
                )
        return rust + text, py + text, quant or variable, alt

    def quantifier(self) -> tuple[str, bool] | None:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            text, variable = c, True
        elif c == "{":
            m = re.compile(r"\{(\d{1,4})(,(\d{0,4}))?\}").match(self.src, self.i)
            if m is None:
                raise self.fail("'{' must start a bound {n}, {n,} or {n,m}; escape it as \\{")
            low = int(m.group(1))
            high = None if m.group(2) and not m.group(3) else int(m.group(3) or low)
            if (high is not None and high < low) or max(low, high or 0) > MAX_REPEAT:
                raise self.fail(f"repeat bounds must satisfy n <= m <= {MAX_REPEAT}")
            self.i = m.end()
            text = m.group(0)
            variable = high != low
        else:
            return None
        nxt = self.peek()
        if nxt == "?":
            self.i += 1
            text += "?"
        elif nxt in ("*", "+", "{"):
            raise self.fail("possessive or doubled quantifiers are not supported")
        return text, variable

    def atom(self) -> tuple[str, str, bool, bool]:
        c = self.peek()
        assert c is not None
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        self.i += 1
        if c == ".":
            return ".", ".", False, False
        if c == "^":
            return "^", "\\A", False, False
        if c == "$":
            return "$", "\\Z", False, False
        if c == "\\":
            return self.escape()
        if c in "*+?":
            raise self.fail("nothing to repeat")
        if c in "{}]":
            raise self.fail(f"escape a literal {c!r} as \\{c}")
        text = _char(c, in_class=False)
        return text, text, False, False

    def group(self) -> tuple[str, str, bool, bool]:
        self.i += 1
        if self.src.startswith("?:", self.i):
            self.i += 2
        elif self.peek() == "?":
            raise self.fail("lookaround, named groups and inline flags are not supported")
        self.groups += 1
        rust, py, quant, alt = self.alternation()
        if self.peek() != ")":
            raise self.fail("missing ')'")
        self.i += 1
        return f"(?:{rust})", f"(?:{py})", quant, alt

    def escape(self) -> tuple[str, str, bool, bool]:
        c = self.peek()
        if c is None:
            raise self.fail("pattern ends with a lone backslash")
        self.i += 1
        if c in _SHORTHAND:
            text = f"[{_SHORTHAND[c]}]"
            return text, text, False, False
        if c.lower() in _SHORTHAND:
            text = f"[^{_SHORTHAND[c.lower()]}]"
            return text, text, False, False
        if c in _CONTROL_ESCAPES:
            text = _char(_CONTROL_ESCAPES[c], in_class=False)
            return text, text, False, False
        if c in _META or c in "#&~-/ ":
            text = _char(c, in_class=False)
            return text, text, False, False
        if c.isdigit():
            raise self.fail("backreferences are not supported")
        raise self.fail(f"unsupported escape \\{c}; escape only metacharacters")

    def class_char(self) -> str:
        c = self.peek()
        if c is None:
            raise self.fail("missing ']'")
        self.i += 1
        if c != "\\":
            if c == "[":
                raise self.fail("nested '[' in a class; escape it as \\[")
            return c
        e = self.peek()
        if e is None:
            raise self.fail("pattern ends with a lone backslash")
        self.i += 1
        if e in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[e]
        if e.isalnum():
            raise self.fail(f"unsupported escape \\{e} inside a class")
        return e

    def char_class(self) -> tuple[str, str, bool, bool]:
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items: list[str] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\" and self.src[self.i + 1 : self.i + 2] in _SHORTHAND:
                items.append(_SHORTHAND[self.src[self.i + 1]])
                self.i += 2
                continue
            if c == "\\" and self.src[self.i + 1 : self.i + 2].lower() in _SHORTHAND:
                raise self.fail("negated shorthands (\\D \\W \\S) are not allowed inside a class")
            low = self.class_char()
            if self.peek() == "-" and self.src[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_char()
                if ord(high) < ord(low):
                    raise self.fail(f"range {low}-{high} is reversed")
                items.append(f"{_char(low, True)}-{_char(high, True)}")
            else:
                items.append(_char(low, True))
        text = "[" + ("^" if negate else "") + "".join(items) + "]"
        return text, text, False, False


def compile_safe(pattern: str) -> SafeRegex:
    """Check ``pattern`` against the safe subset; raise :class:`RegexRejected` with a fix hint."""
    if not pattern:
        raise RegexRejected("regex must not be empty")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RegexRejected(f"regex is longer than {MAX_PATTERN_LENGTH} characters; shorten it")
    parser = _Parser(pattern)
    rust, py, _, _ = parser.alternation()
    if parser.i != len(pattern):
        raise parser.fail("unbalanced ')'")
    try:
        compiled = re.compile(py)
        linear = re2.compile(rust, _RE2_OPTIONS)
    except (re.error, re2.error, UnicodeEncodeError) as exc:
        # RE2 refuses some patterns the subset admits (nested counts over 1,000 in all, such
        # as (?:x{100}){100}), and text with no UTF-8 form.
        raise RegexRejected(f"regex {pattern!r} cannot be compiled: {exc}") from exc
    return SafeRegex(source=pattern, rust=rust, python=compiled, linear=linear)


def glob_to_regex(glob: str) -> SafeRegex:
    """A tool or resource glob: ``*`` matches any run of characters (dots included), the rest is
    literal. The result is anchored at both ends."""
    parts = [_char(c, in_class=False) for c in re.sub(r"\*+", "*", glob)]
    rust = "^" + "".join("(?s:.*)" if p == "\\*" else p for p in parts) + "$"
    py = "\\A" + "".join("(?s:.*)" if p == "\\*" else p for p in parts) + "\\Z"
    return SafeRegex(source=glob, rust=rust, python=re.compile(py))
