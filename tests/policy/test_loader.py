"""Loading refuses bad policies at load time, naming file, line, path and a fix."""

from __future__ import annotations

import textwrap

import pytest

from aegis.errors import PolicyError
from aegis.policy.loader import load_document
from aegis.policy.yamlsource import parse_source

HEAD = "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n"


def _rules(body: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(body), "    ")


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_document(text, "p.yaml")
    assert info.value.code == "policy_invalid"
    return info.value


BAD = [
    # (rules yaml, expected line, path fragment, message fragment)
    (
        "- {id: a, action: allow, when: {path: tool, equals: x}}\n",
        6,
        "when.equals",
        "unknown field 'equals'",
    ),
    (
        "- {id: a, action: allow, when: {path: request.body.n, lt: '5'}}\n",
        6,
        "when.lt",
        "expected a number",
    ),
    ("- {id: a, action: alow}\n", 6, "action", "'allow', 'deny'"),
    (
        "- {id: a, action: allow, when: {path: tool, regex: '(a+)+'}}\n",
        6,
        "when.regex",
        "nested quantifiers",
    ),
    (
        "- {id: a, action: allow, when: {path: tool, regex: '(a)\\1'}}\n",
        6,
        "when.regex",
        "backreferences",
    ),
    (
        "- {id: a, action: allow, when: {path: tool, regex: '(?=a)'}}\n",
        6,
        "when.regex",
        "lookaround",
    ),
    ("- {id: a, action: allow, when: {path: tool, regex: '(a|ab)*'}}\n", 6, "when.regex", "'|'"),
    ("- {id: a, action: allow, when: {path: tool, in: []}}\n", 6, "when.in", "at least 1"),
    ("- {id: a, action: allow, match: {tools: []}}\n", 6, "match.tools", "at least 1"),
    (
        "- {id: a, action: allow, when: {path: tool, eq: 1, ne: 2}}\n",
        6,
        "when",
        "exactly one operator",
    ),
    ("- {id: a, action: allow, when: {lt: 3}}\n", 6, "when", "needs a 'path'"),
    (
        "- {id: a, action: allow, when: {path: nothere.x, eq: 1}}\n",
        6,
        "when.path",
        "must start with",
    ),
    ("- {id: a, action: allow}\n- {id: a, action: deny}\n", 7, "rules[1].id", "duplicate rule id"),
    (
        "- id: a\n  action: allow\n  when:\n    all:\n      - {path: request.body.n, lt: 5}\n      - {path: request.body.n, gt: 10}\n",
        11,
        "all[1]",
        "can never match",
    ),
    (
        "- id: a\n  action: allow\n  when:\n    all:\n      - {path: tenant, eq: x}\n      - {path: tenant, eq: y}\n",
        11,
        "all[1]",
        "two different 'eq'",
    ),
    (
        "- id: a\n  action: allow\n  when:\n    all:\n      - {path: tenant, eq: z}\n      - {path: tenant, in: [x, y]}\n",
        10,
        "all[0]",
        "not in the 'in' list",
    ),
    (
        "- {id: a, action: allow, when: {time: {tz: Mars/Base, hours: {start: '08:00', end: '09:00'}}}}\n",
        6,
        "time.tz",
        "unknown time zone",
    ),
    (
        "- {id: a, action: allow, when: {time: {hours: {start: '18:00', end: '08:00'}}}}\n",
        6,
        "hours",
        "before hours.end",
    ),
    ("- {id: a, action: sanitize}\n", 6, "rules[0]", "'obligations' is required"),
    ("- {id: a, action: approval_needed}\n", 6, "rules[0]", "'approval' is required"),
    ("- {id: Bad Id, action: allow}\n", 6, "id", "must match"),
    ("- {id: a, action: allow, match: {tools: ['a*b*c*d*e']}}\n", 6, "tools", "more than 3"),
    (
        "- {id: a, action: allow, match: {chain: {min_depth: 3, max_depth: 1}}}\n",
        6,
        "chain",
        "never match",
    ),
    (
        "- {id: a, action: allow, when: {path: tool, eq: yes}}\n- {id: a, action: deny}\n",
        7,
        "id",
        "duplicate",
    ),
    (
        "- {id: a, action: allow, when: {time: {dates: {start: '2100-01-02'}}}}\n",
        6,
        "when.time.dates",
        "never reached",
    ),
]


#: A trailing newline (what a YAML block scalar ``path: |`` adds) passed the checks, whose ``$``
#: matches before a final newline: Python then read the member "amount\n" (never there) and
#: the Rego bundle read ``.amount`` with a line break after it, so a deny over 5000 fired in
#: one engine and not in the other.
NEWLINES = [
    '- {id: a, action: deny, when: {path: "request.body.amount\\n", gt: 5000}}\n',
    '- {id: a, action: allow, when: {path: "agent.attributes.tier\\n", eq: gold}}\n',
    '- {id: a, action: allow, when: {time: {dates: {start: "2025-01-01\\n"}}}}\n',
    '- {id: a, action: allow, when: {time: {hours: {start: "08:00\\n", end: "09:00"}}}}\n',
    '- {id: "a\\n", action: allow}\n',
    "- {id: a, action: sanitize, obligations: [{kind: redact, target: response, "
    'path: "customer.ssn\\n"}]}\n',
    "- {id: a, action: sanitize, obligations: [{kind: drop_header, target: request, "
    'header: "x-a\\nb"}]}\n',
    '- {id: a, action: approval_needed, approval: {group: "finance\\n"}}\n',
]


@pytest.mark.parametrize("rules", NEWLINES)
def test_a_name_ending_in_a_newline_is_refused(rules: str) -> None:
    err = _error(_rules(rules))
    assert err.code == "policy_invalid"


def test_a_block_scalar_path_is_refused_with_its_line() -> None:
    text = _rules("""\
        - id: a
          action: deny
          when:
            path: |
              request.body.amount
            gt: 5000
    """)
    err = _error(text)
    assert "path" in err.details["path"], err.message


@pytest.mark.parametrize(("rules", "line", "path", "message"), BAD)
def test_bad_policies_name_line_path_and_problem(
    rules: str, line: int, path: str, message: str
) -> None:
    err = _error(_rules(rules))
    assert err.details["file"] == "p.yaml"
    assert err.details["line"] == line, err.message
    assert path in err.details["path"], err.message
    assert message in err.message
    assert err.message.startswith(f"p.yaml:{line}: ")
    assert err.message == err.message.lower() or "'" in err.message  # lowercase prose


def test_unknown_field_hint_suggests_the_closest_name() -> None:
    err = _error(_rules("- {id: a, action: allow, when: {path: tool, regx: '^a'}}\n"))
    assert "did you mean 'regex'?" in err.message


def test_a_field_of_another_level_is_named_as_misplaced() -> None:
    """``obligations`` under ``when`` is a known field in the wrong place, not a misspelling."""
    err = _error(_rules("- {id: a, action: allow, when: {path: tool, eq: x, obligations: []}}\n"))
    assert "does not belong under" in err.message and "did you mean" not in err.message


def test_every_problem_is_listed() -> None:
    err = _error(_rules("- {id: a, action: alow}\n- {id: b, action: allow, bogus: 1}\n"))
    assert len(err.details["errors"]) == 2
    assert "(and 1 more)" in err.message


def test_top_level_problems() -> None:
    assert (
        "apiVersion"
        in _error(
            "apiVersion: aegis/v2\nkind: Policy\nmetadata: {name: p}\nspec: {rules: []}\n"
        ).message
    )
    assert (
        "kind"
        in _error(
            "apiVersion: aegis/v1\nmetadata: {name: p}\nspec: {rules: [{id: a, action: allow}]}\n"
        ).message
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("a: &x {b: 1}\nc: *x\n", "anchors and aliases"),
        ("a: [1,\n", "yaml syntax error"),
        ("? [1]\n: 2\n", "keys must be strings"),
        ("a: !!python/object:os.system x\n", "unsupported yaml tag"),
        # A tag on a collection was dropped, and !!str on a numeral read as the number.
        ("a: !!python/object/apply:os.system {b: x}\n", "unsupported yaml tag"),
        ("a: !custom [1, 2]\n", "unsupported yaml tag"),
        ("a: !!set {b, c}\n", "unsupported yaml tag"),
        ("a: !!str 42\n", "unsupported yaml tag"),
        ("a: !!int '42'\n", "unsupported yaml tag"),
        # libyaml's composer recursed in C: this many '[' crashed the process.
        ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests deeper than 64"),
        ("a: .nan\n", "finite"),
        ("", "exactly one yaml document"),
        ("a: 1\n---\nb: 2\n", "exactly one yaml document"),
    ],
)
def test_yaml_is_read_strictly(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_source(text, "x.yaml")


def test_yaml_11_booleans_and_dates_stay_strings() -> None:
    doc = parse_source("a: NO\nb: yes\nc: true\nd: 2025-01-01\ne: '0x10'\n").value
    assert doc == {"a": "NO", "b": "yes", "c": True, "d": "2025-01-01", "e": "0x10"}


@pytest.mark.parametrize("numeral", ["0777", "0x1F", "0b101", "10:30", "1_000", "1_0.5", "1:30.5"])
def test_numerals_yaml_11_reads_otherwise_than_json_are_refused(numeral: str) -> None:
    with pytest.raises(PolicyError, match=r"reads differently in YAML 1\.1 and JSON"):
        parse_source(f"a: {numeral}\n")
    assert parse_source(f"a: '{numeral}'\n").value == {"a": numeral}  # quoted: a string


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e+16", 1e16), ("1e-05", 1e-05), ("1E5", 1e5), ("-2e3", -2000.0), ("12", 12), ("-0", 0),
     ("1.5", 1.5)],
)  # fmt: skip
def test_json_numerals_are_numbers(text: str, value: float) -> None:
    assert parse_source(f"a: {text}\n").value == {"a": value}
    assert parse_source(f'{{"a": {text}}}').value == {"a": value}


def test_json_documents_load_too() -> None:
    text = '{"apiVersion": "aegis/v1", "kind": "Policy", "metadata": {"name": "j"}, "spec": {"rules": [{"id": "a", "action": "allow"}]}}'
    assert load_document(text).metadata.name == "j"


def test_oversized_documents_are_refused() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        parse_source(b"a: " + b"x" * (8 << 20))


def test_eq_null_survives_canonical_form() -> None:
    doc = load_document(_rules("- {id: a, action: allow, when: {path: chain.parent, eq: null}}\n"))
    assert doc.canonical()["spec"]["rules"][0]["when"] == {"path": "chain.parent", "eq": None}


@pytest.mark.parametrize(
    "when",
    ["{path: request.body.x, exists: }", "{path: request.body.x, exists: ~}",
     "{path: request.body.x, lt: null}", "{path: request.body.x, in: null}",
     "{path: request.body.x, contains: null}", "{path: request.body.x, regex: null}",
     "{time: null}", "{all: null}", "{any: null}", "{not: null}"],
)  # fmt: skip
def test_an_operator_without_a_value_is_refused(when: str) -> None:
    """`exists:` with nothing after it reads as null in YAML: a deny rule on it would test
    nothing (and its canonical form would lose the operator)."""
    error = _error(_rules(f"- {{id: d, action: deny, when: {when}}}\n"))
    assert "needs a value" in error.message


def test_eq_and_ne_may_still_test_null() -> None:
    for op in ("eq", "ne"):
        load_document(
            _rules(f"- {{id: d, action: deny, when: {{path: request.body.x, {op}: null}}}}\n")
        )


@pytest.mark.parametrize("tz", ["localtime", "posixrules", "Factory", "right/UTC", "posix/UTC"])
def test_a_time_zone_outside_the_iana_database_is_refused(tz: str) -> None:
    window = f"{{time: {{tz: {tz}, hours: {{from: 9, to: 17}}}}}}"
    error = _error(_rules(f"- {{id: d, action: deny, when: {window}}}\n"))
    assert "unknown time zone" in error.message


@pytest.mark.parametrize(
    ("api", "when", "field"),
    [
        ("apiVersion", "{path: request.body.amount, in_: [2]}", "in_"),
        ("apiVersion", "{all_: [{path: request.body.amount, gt: 5}]}", "all_"),
        ("apiVersion", "{not_: {path: request.body.amount, exists: true}}", "not_"),
        ("api_version", "{path: request.body.amount, gt: 5}", "apiVersion"),
    ],
)
def test_the_models_python_names_are_unknown_fields(api: str, when: str, field: str) -> None:
    """Only the documented names (the published schema's: ``in``, ``all``, ``not``,
    ``apiVersion``) are read; the models' Python names are unknown fields, as schema-based
    tools read them."""
    doc = (
        f"{api}: aegis/v1\nkind: Policy\nmetadata: {{name: p}}\nspec:\n  rules:\n"
        f"    - {{id: a, action: allow}}\n    - {{id: d, action: deny, when: {when}}}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_document(doc)
    message = info.value.message
    assert f"unknown field '{field}'" in message or f"field '{field}' is required" in message


@pytest.mark.parametrize(
    "when",
    [
        "{path: request.body.ids, eq: [9007199254740993]}",
        "{path: request.body.o, eq: {id: 9007199254740993}}",
        "{path: request.body.ids, in: [[9007199254740993]]}",
    ],
)
def test_an_integer_beyond_2_53_is_refused_inside_a_literal_too(when: str) -> None:
    """A body never holds such an integer (the gateway refuses it), so a deny on a literal
    holding one would never fire: refused at load, however deep in the literal."""
    doc = (
        "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n"
        f"    - {{id: a, action: allow}}\n    - {{id: d, action: deny, when: {when}}}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_document(doc)
    assert "2**53" in info.value.message


def test_a_stored_document_with_one_id_twice_is_never_compiled() -> None:
    """The loader refuses a repeated rule id; a stored row written around it is refused when
    compiled (the Rego bundle keys rules by id: a deny sharing its id with an allow would read
    as the allow there), never decided."""
    from aegis.policy.evaluator import compile_policy
    from aegis.policy.model import STORED, PolicyDocument

    rules = [{"id": "r", "action": "deny", "when": {"path": "request.body.amount", "gt": 100}},
             {"id": "r", "action": "allow"}]  # fmt: skip
    body = {"apiVersion": "aegis/v1", "kind": "Policy", "metadata": {"name": "dup"},
            "spec": {"rules": rules}}  # fmt: skip
    doc = PolicyDocument.model_validate(body, context=STORED)  # as a stored row is read back
    with pytest.raises(PolicyError, match="unique"):
        compile_policy(doc, version="v1")
