"""Loading ``aegis/v1`` policy documents, with errors that name file, line, path and a fix.

``load_document`` parses YAML or JSON with :mod:`aegis.policy.yamlsource`, validates it against
:class:`~aegis.policy.model.PolicyDocument`, runs :func:`~aegis.policy.checks.check_document`, and
raises one :class:`~aegis.errors.PolicyError` with code ``policy_invalid`` whose message reads
``file:line: path: problem; hint`` and whose ``errors`` detail lists every problem found.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from aegis.errors import PolicyError
from aegis.policy.checks import check_document
from aegis.policy.model import Condition, PolicyDocument
from aegis.policy.yamlsource import SourceDoc, parse_source

__all__ = ["MAX_REPORTED_ERRORS", "load_document", "load_file"]

MAX_REPORTED_ERRORS: Final = 20

_HINTS: Final = {
    "string_type": "expected a string; quote the value",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "missing": "add the field",
    "too_short": "an empty list can never match; remove the field or add a value",
    "literal_error": "use one of the listed values",
}


def _fields_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _known_fields() -> list[str]:
    """Every field name of the schema (for 'did you mean' hints)."""
    names: set[str] = set()
    for model in _MODELS:
        names.update(_fields_of(model))
    return sorted(names)


def _trim(value: Any, loc: tuple[Any, ...], error_type: str) -> tuple[str | int, ...]:
    """Keep the parts of a pydantic ``loc`` that exist in the document (drop union tags)."""
    out: list[str | int] = []
    node: Any = value
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[int(part)]
        elif i == len(loc) - 1 and error_type == "missing" and isinstance(part, str):
            out.append(part)
            break
        else:
            continue
        out.append(part)
    return tuple(out)


def _dotted(loc: tuple[str | int, ...]) -> str:
    return "".join(
        f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc)
    )


def _entry(src: SourceDoc, loc: tuple[str | int, ...], message: str, hint: str) -> dict[str, Any]:
    return {
        "file": src.file,
        "line": src.line_of(loc),
        "path": _dotted(loc),
        "message": message,
        "hint": hint,
    }


def _from_pydantic(src: SourceDoc, exc: ValidationError) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[tuple[str | int, ...]] = set()
    for err in exc.errors(include_url=False):
        loc = _trim(src.value, tuple(err["loc"]), err["type"])
        if loc in seen:  # a union reports each branch; the first says enough
            continue
        seen.add(loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        hint = _HINTS.get(err["type"], "see docs/policy.md")
        if err["type"] == "extra_forbidden":
            field = str(loc[-1]) if loc else "?"
            message = f"unknown field {field!r}"
            close = difflib.get_close_matches(field, _known_fields(), n=1)
            if close and close[0] == field:
                # A field of another level (obligations under when, approval under match).
                where = ".".join(str(part) for part in loc[:-1]) or "the document"
                hint = f"{field!r} does not belong under {where}; see docs/policy.md for its place"
            else:
                hint = f"did you mean {close[0]!r}?" if close else "remove it; see docs/policy.md"
        elif err["type"] == "missing":
            message = f"field {loc[-1]!r} is required" if loc else "a field is required"
        elif err["type"] in ("int_type", "float_type"):
            message = "expected a number"
            hint = "remove the quotes if it is one"
        out.append(_entry(src, loc, message.lower() if message[:1].isupper() else message, hint))
    return out


def load_document(text: str | bytes, file: str = "<policy>") -> PolicyDocument:
    """Parse and validate one policy document, or raise ``PolicyError(code="policy_invalid")``."""
    src = parse_source(text, file)
    errors: list[dict[str, Any]]
    try:
        doc = PolicyDocument.model_validate(src.value)
    except ValidationError as exc:
        errors = _from_pydantic(src, exc)
    else:
        errors = [
            _entry(src, loc, message, "fix or remove the rule")
            for loc, message in check_document(doc)
        ]
        if not errors:
            return doc
    first = errors[0]
    where = f"{first['file']}:{first['line']}" if first["line"] else first["file"]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise PolicyError(
        f"{where}: {first['path'] or '<document>'}: {first['message']}; {first['hint']}{more}",
        code="policy_invalid",
        file=first["file"],
        line=first["line"],
        path=first["path"],
        errors=errors[:MAX_REPORTED_ERRORS],
    )


def load_file(path: str | Path) -> PolicyDocument:
    """Read and load a policy file (YAML or JSON)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"{p}: cannot read the policy file ({exc.strerror or exc}); check the path",
            code="policy_invalid",
            file=str(p),
        ) from exc
    return load_document(data, str(p))


def _models() -> tuple[type[BaseModel], ...]:
    from aegis.policy import model as m

    return (
        m.PolicyDocument, m.Metadata, m.Spec, m.Rule, m.Match, m.AgentMatch, m.ChainMatch,
        Condition, m.TimeWindow, m.HourRange, m.DateRange, m.Obligation, m.Approval,
    )  # fmt: skip


_MODELS: Final = _models()
