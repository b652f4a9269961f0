"""The RE2-safe subset: what is refused, and that Python and Rust regex agree on the rest."""

from __future__ import annotations

import concurrent.futures
import json
import re

import pytest
import regorus
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.policy.safe_regex import (
    MAX_SUBJECT_LENGTH,
    MAX_VARIABLE_REPEATS,
    RegexRejected,
    compile_safe,
    glob_to_regex,
)

ACCEPTED = [
    r"^[A-Z]{2}[0-9]{10}$",
    r"\d+\.\d{2}",
    r"^(foo|bar)$",
    r"(?:ab)+c",
    r"[^@\s]+@[a-z]+\.[a-z]{2,}",
    r"a.c",
    r"[\]\-\\]",
    r"^é+$",
    r"\t\n",
    r"x{0,3}y*?",
    r"(-[0-9]{4}){0,3}",
    r"a\|b\&c#d~e-f",
]
REFUSED = {
    r"(a+)+": "nested quantifiers",
    r"(a*)*b": "nested quantifiers",
    r"(a|aa)+": "'|'",
    r"(a)\1": "backreferences",
    r"(?=x)": "lookaround",
    r"(?<!x)y": "lookaround",
    r"(?i)abc": "inline flags",
    r"(?P<n>a)": "named groups",
    r"a++": "possessive",
    r"a{3,2}": "bounds",
    r"a{1001}": "bounds",
    r"*a": "nothing to repeat",
    r"a{": "bound",
    r"ab)": "unbalanced",
    r"(ab": "missing ')'",
    r"[ab": "missing ']'",
    r"\bword": "unsupported escape",
    r"[\D]": "negated shorthands",
    r"[z-a]": "reversed",
    "a+b+c+d+": f"more than {MAX_VARIABLE_REPEATS}",
    "": "empty",
    "a" * 600: "longer than",
}


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_safe_patterns_compile(pattern: str) -> None:
    compile_safe(pattern)


@pytest.mark.parametrize(("pattern", "reason"), REFUSED.items())
def test_dangerous_or_ambiguous_patterns_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(RegexRejected, match=re.escape(reason)):
        compile_safe(pattern)


def test_dollar_means_end_of_text_in_both_engines() -> None:
    # Python's bare '$' also matches before a final newline; RE2 and Rust do not.
    assert not compile_safe("^abc$").search("abc\n")
    assert compile_safe("^abc$").search("abc")


def test_shorthands_are_ascii_only() -> None:
    assert not compile_safe(r"^\d$").search("٣")  # Arabic-Indic digit three
    assert compile_safe(r"^\d$").search("3")


def test_globs_are_literal_except_star() -> None:
    g = glob_to_regex("a.b*(c)")
    assert g.search("a.b(c)")
    assert g.search("a.bxx\nyy(c)")
    assert not g.search("axb(c)")
    assert not g.search("a.b(c)z")


class _Rust:
    def __init__(self) -> None:
        self.engine = regorus.Engine()
        self.engine.add_policy(
            "r.rego",
            "package r\nimport rego.v1\nm := [regex.match(p, s) | some [p, s] in input.pairs]\n",
        )

    def matches(self, pairs: list[tuple[str, str]]) -> list[bool]:
        self.engine.set_input_json(json.dumps({"pairs": pairs}))
        return list(json.loads(self.engine.eval_rule_as_json("data.r.m")))


RUST = _Rust()
SUBJECTS = st.text(alphabet=st.sampled_from("aAbz09.-_ @\n\t\\é[]"), max_size=12)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(pattern=st.sampled_from(ACCEPTED), subjects=st.lists(SUBJECTS, min_size=1, max_size=8))
def test_python_and_rust_renderings_agree(pattern: str, subjects: list[str]) -> None:
    regex = compile_safe(pattern)
    ours = [regex.search(s) for s in subjects]
    assert ours == RUST.matches([(regex.rust, s) for s in subjects])


ATOMS = st.sampled_from(
    ["a", "b", ".", r"\d", r"\w", r"\s", "[a-c]", "[^a]", r"\.", "é", "(?:ab)", "(a|b)"]
)
QUANTS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,2}", "*?"])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    parts=st.lists(st.tuples(ATOMS, QUANTS), min_size=1, max_size=4),
    anchors=st.tuples(st.booleans(), st.booleans()),
    subjects=st.lists(SUBJECTS, min_size=1, max_size=6),
)
def test_generated_patterns_agree_or_are_refused(
    parts: list[tuple[str, str]], anchors: tuple[bool, bool], subjects: list[str]
) -> None:
    pattern = (
        ("^" if anchors[0] else "") + "".join(a + q for a, q in parts) + ("$" if anchors[1] else "")
    )
    try:
        regex = compile_safe(pattern)
    except RegexRejected:
        return
    assert [regex.search(s) for s in subjects] == RUST.matches([(regex.rust, s) for s in subjects])


@pytest.mark.parametrize("pattern", ["a*a*a*b", "a{0,1000}a{0,1000}a{0,1000}b", r"\w+\s?\w+="])
def test_patterns_that_backtrack_for_minutes_in_python_are_matched_by_re2(pattern: str) -> None:
    """Inside the subset, overlapping repeats still make a backtracking engine polynomial (about
    a minute for a*a*a*b over 4,096 characters); a regex condition is matched by RE2 instead.
    Bounded: the search runs on a worker thread and the test gives up after 10 s."""
    regex = compile_safe(pattern)
    subject = "a" * MAX_SUBJECT_LENGTH
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        found = pool.submit(regex.search, subject).result(timeout=10)
    assert found is False
    assert regex.search("a" * 20 + ("b" if pattern.endswith("b") else " a=")) is True


def test_a_pattern_re2_refuses_is_refused_at_load_with_a_reason() -> None:
    # Nested fixed counts are in the subset, but RE2 caps a repetition at 1,000 in all.
    with pytest.raises(RegexRejected, match="cannot be compiled"):
        compile_safe("(?:x{100}){100}")
