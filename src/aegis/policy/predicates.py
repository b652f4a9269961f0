"""Python predicates for lowered leaves and nodes: the in-process half of the two engines.

Each leaf becomes a closure ``pred(doc, errors) -> bool``. A leaf whose operator can fail appends
its error message to ``errors`` and returns False; nodes built with ``eager=True`` evaluate every
child so that a rule error is found whatever the order of ``any``/``all`` children (Rego
evaluates every body too, so the two engines agree on which rules failed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from aegis.policy.ir import MAX_UNIX, Leaf, Node
from aegis.policy.safe_regex import MAX_SUBJECT_LENGTH
from aegis.policy.values import (
    MISSING,
    SCALAR_TYPES,
    is_number,
    json_equal,
    scalar_types,
    whole_numbers,
)

__all__ = ["Pred", "compile_node", "getter", "window_contains"]

Pred = Callable[[Any, list[str]], bool]
Getter = Callable[[Any], Any]
_WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def getter(path: tuple[str, ...]) -> Getter:
    """A lookup specialised for short paths (the hot path reads one to four keys)."""
    if len(path) == 1:
        (k0,) = path
        return lambda d: d.get(k0, MISSING) if type(d) is dict else MISSING
    if len(path) == 2:
        k0, k1 = path

        def get2(d: Any) -> Any:
            v = d.get(k0, MISSING) if type(d) is dict else MISSING
            return v.get(k1, MISSING) if type(v) is dict else MISSING

        return get2

    def get_n(d: Any) -> Any:
        for key in path:
            if type(d) is not dict:
                return MISSING
            d = d.get(key, MISSING)
        return d

    return get_n


def window_contains(leaf: Leaf, unix: int) -> bool:
    window = leaf.window
    assert window is not None
    local = datetime.fromtimestamp(unix, ZoneInfo(window.tz))
    if window.weekdays is not None and _WEEKDAYS[local.weekday()] not in window.weekdays:
        return False
    if window.hours is not None:
        minute = local.hour * 60 + local.minute
        if not _minutes(window.hours.start) <= minute < _minutes(window.hours.end):
            return False
    if window.dates is not None:
        day = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
        if window.dates.start is not None and day < window.dates.start:
            return False
        if window.dates.end is not None and day > window.dates.end:
            return False
    return True


def _minutes(hhmm: str) -> int:
    return int(hhmm[:2]) * 60 + int(hhmm[3:])


def _refused(leaf: Leaf) -> tuple[frozenset[type], bool]:
    """What makes a present value a rule error for an ``eq ne in not_in`` leaf: the Python types of
    the scalar types the literal does not hold, and whether a number with a fraction is refused
    (every number of the literal is whole). Nothing for a selector, which never errors."""
    if leaf.error is None:
        return frozenset(), False
    literals = leaf.value if leaf.op in ("in", "not_in") else (leaf.value,)
    held = scalar_types(literals)
    wrong = frozenset(t for t, name in SCALAR_TYPES.items() if name not in held)
    return wrong, whole_numbers(literals)


def _leaf(leaf: Leaf) -> Pred:
    get, op, lit, err = getter(leaf.path), leaf.op, leaf.value, leaf.error or ""
    if op in ("eq", "ne", "in", "not_in"):
        wrong, whole = _refused(leaf)
        if wrong or whole:
            return _strict(leaf, get, wrong, whole)
    if op == "eq" and type(lit) is str:
        return lambda d, e: get(d) == lit
    if op == "eq":
        return lambda d, e: (x := get(d)) is not MISSING and json_equal(x, lit)
    if op == "ne":
        return lambda d, e: (x := get(d)) is not MISSING and not json_equal(x, lit)
    if op in ("in", "not_in"):
        strings = frozenset(lit) if all(type(v) is str for v in lit) else None
        want = op == "in"

        def member(d: Any, e: list[str]) -> bool:
            x = get(d)
            if x is MISSING:
                return False
            if strings is not None:
                return (type(x) is str and x in strings) == want
            return any(json_equal(x, v) for v in lit) == want

        return member
    if op == "exists":
        return (lambda d, e: get(d) is not MISSING) if lit else (lambda d, e: get(d) is MISSING)
    if op == "glob":
        matchers = tuple(r.python.match for r in leaf.regexes)
        return lambda d, e: type(x := get(d)) is str and any(m(x) for m in matchers)
    if op == "intersects":
        return lambda d, e: (
            type(x := get(d)) is list and any(json_equal(a, b) for a in x for b in lit)
        )
    if op == "contains":

        def contains(d: Any, e: list[str]) -> bool:
            x = get(d)
            if type(x) is str:
                return lit in x
            if type(x) is list:
                return any(json_equal(v, lit) for v in x)
            if x is not MISSING:
                e.append(err)
            return False

        return contains
    if op in ("lt", "lte", "gt", "gte"):
        compare: Callable[[Any], bool] = {
            "lt": lambda x: x < lit,
            "lte": lambda x: x <= lit,
            "gt": lambda x: x > lit,
            "gte": lambda x: x >= lit,
        }[op]

        def ordered(d: Any, e: list[str]) -> bool:
            x = get(d)
            if is_number(x):
                return compare(x)
            if x is not MISSING:
                e.append(err)
            return False

        return ordered
    if op == "regex":
        search = leaf.regexes[0].linear.search  # RE2: linear time in the subject

        def regex(d: Any, e: list[str]) -> bool:
            x = get(d)
            if type(x) is str and len(x) <= MAX_SUBJECT_LENGTH:
                return search(x) is not None
            if x is not MISSING:
                e.append(err)
            return False

        return regex
    if op == "time":

        def in_window(d: Any, e: list[str]) -> bool:
            t = get(d)
            if is_number(t) and 0 <= t < MAX_UNIX and float(t).is_integer():
                return window_contains(leaf, int(t))
            if t is not MISSING:
                e.append(err)
            return False

        return in_window
    raise AssertionError(f"unknown operator {op!r}")  # the lowering never produces one


def _strict(leaf: Leaf, get: Getter, wrong: frozenset[type], whole: bool) -> Pred:
    """``eq ne in not_in`` in a condition: a present value whose type is in ``wrong`` (a scalar
    type the literal does not hold) is a rule error, and so is NaN or an infinity (no JSON number;
    the gateway refuses them before policy runs) and, when ``whole``, a number with a fraction
    (no whole literal equals it; a server binding it to an integer reads a whole one). The equal
    case, the hot one, is decided before the type is looked at; a missing value's type is never in
    ``wrong``."""
    op, lit, err = leaf.op, leaf.value, leaf.error or ""
    # Which floats may be compared (NaN and the infinities are neither whole nor finite).
    fits: Callable[[float], bool] = float.is_integer if whole else math.isfinite
    if op == "eq" and type(lit) is str:

        def eq_string(d: Any, e: list[str]) -> bool:
            x = get(d)
            if x == lit:  # only a str equals a str literal
                return True
            if (t := type(x)) in wrong or (t is float and not fits(x)):
                e.append(err)
            return False

        return eq_string
    if op in ("eq", "ne"):
        want = op == "eq"

        def compare(d: Any, e: list[str]) -> bool:
            x = get(d)
            if x is MISSING:
                return False
            if json_equal(x, lit):
                return want
            if (t := type(x)) in wrong or (t is float and not fits(x)):
                e.append(err)
                return False
            return not want

        return compare
    strings = frozenset(lit) if all(type(v) is str for v in lit) else None
    want = op == "in"

    def member(d: Any, e: list[str]) -> bool:
        x = get(d)
        if (t := type(x)) is str and strings is not None:
            return (x in strings) == want
        if t in wrong or (t is float and not fits(x)):  # no element can equal it
            e.append(err)
            return False
        if x is MISSING:
            return False
        return any(json_equal(x, v) for v in lit) == want

    return member


def compile_node(node: Leaf | Node, *, eager: bool) -> Pred:
    """A predicate for a tree; ``eager`` evaluates every child (needed when a leaf can fail)."""
    if isinstance(node, Leaf):
        return _leaf(node)
    kids = tuple(compile_node(c, eager=eager) for c in node.children)
    if node.kind == "not":
        (only,) = kids
        return lambda d, e: not only(d, e)
    if node.kind == "all":
        if not eager:
            return lambda d, e: all(k(d, e) for k in kids)

        def all_eager(d: Any, e: list[str]) -> bool:
            result = True
            for k in kids:
                if not k(d, e):
                    result = False
            return result

        return all_eager
    if not eager:
        return lambda d, e: any(k(d, e) for k in kids)

    def any_eager(d: Any, e: list[str]) -> bool:
        result = False
        for k in kids:
            if k(d, e):
                result = True
        return result

    return any_eager
