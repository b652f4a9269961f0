"""JSON value semantics shared by both engines: strict equality, the number test, scalar types.

Rego compares JSON values structurally, with ``1 == 1.0`` but ``true != 1`` and ``"1" != 1``.
Python's ``==`` says ``True == 1``, so the in-process evaluator uses :func:`json_equal` wherever a
policy compares values, and :func:`is_number` wherever it needs a number. :func:`scalar_types`
names the JSON types of a comparison's literals, so that both engines refuse a value of another
scalar type instead of comparing it, and :func:`whole_numbers` tells whether they refuse a number
with a fraction too (see :mod:`aegis.policy.ir`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Final

__all__ = [
    "MISSING",
    "SCALAR_TYPES",
    "is_number",
    "json_equal",
    "lookup",
    "scalar_types",
    "whole_numbers",
]

#: The JSON type of a scalar, by its exact Python type (``bool`` is not a number).
SCALAR_TYPES: Final[dict[type, str]] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
}


class _Missing:
    """The value of a path that is not in the input (Rego's *undefined*)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def is_number(v: Any) -> bool:
    """A JSON number: ``int`` or a finite ``float``, never ``bool``. NaN and infinity are not
    JSON numbers; taken as numbers, NaN would make every comparison false and slip past a
    numeric deny rule."""
    t = type(v)
    return t is int or (t is float and math.isfinite(v))


def json_equal(a: Any, b: Any) -> bool:
    """Structural JSON equality with Rego's rules (numbers by value, no bool/number mixing)."""
    ta, tb = type(a), type(b)
    if ta is str or tb is str:
        return ta is tb and a == b
    if is_number(a) or is_number(b):
        return is_number(a) and is_number(b) and a == b
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ta is dict:
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def scalar_types(values: Iterable[Any]) -> frozenset[str]:
    """The JSON types (``string``, ``number``, ``boolean``) of the scalars among ``values``;
    ``null``, lists and objects have none."""
    return frozenset(t for v in values if (t := SCALAR_TYPES.get(type(v))) is not None)


def whole_numbers(values: Iterable[Any]) -> bool:
    """Whether ``values`` hold a number and every number among them is whole (``42``, ``42.0``):
    then no number with a fraction equals one of them, yet servers that drop the fraction (Jackson
    binding ``42.5`` to an ``int``, Rails ``to_i``, PHP ``(int)``) read it as one."""
    numbers = [v for v in values if is_number(v)]
    return bool(numbers) and all(type(v) is int or v.is_integer() for v in numbers)


def lookup(doc: Any, keys: tuple[str, ...]) -> Any:
    """The value at ``keys`` (object keys only), or :data:`MISSING`."""
    for key in keys:
        if type(doc) is not dict:
            return MISSING
        doc = doc.get(key, MISSING)
        if doc is MISSING:
            return MISSING
    return doc
