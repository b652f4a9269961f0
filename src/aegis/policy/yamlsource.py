"""YAML 1.1 documents read strictly, with the line of every node (for file:line:path errors).

PyYAML's composer gives each node a start mark; this module turns the node tree into plain JSON
values and keeps a map from JSON path (a tuple of keys and list indices) to a 1-based line number.
It is stricter than ``yaml.safe_load`` on purpose, because a policy is security configuration:

* duplicate mapping keys are an error (``safe_load`` silently keeps the last one);
* anchors and aliases are refused (no shared subtrees, no "billion laughs");
* only ``true`` / ``false`` are booleans: YAML 1.1 ``yes``/``no``/``on``/``off`` stay strings, so
  a country code ``NO`` never turns into ``false``;
* timestamps stay strings (dates in time windows are parsed by the model, not by YAML);
* numbers mean what they mean in JSON: YAML 1.1 octal, hex, binary, base-60 and ``_`` numerals
  (``0777``, ``0x1F``, ``10:30``) are refused, and ``1e+16`` is a number, not a string;
* mapping keys must be strings, and documents are limited in size and depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from aegis.errors import PolicyError

__all__ = ["MAX_DEPTH", "MAX_DOCUMENT_BYTES", "SourceDoc", "parse_source"]

#: A policy larger than this is refused before parsing (room for MAX_RULES rules, and no more).
MAX_DOCUMENT_BYTES: Final = 8 << 20
#: Nesting deeper than this is refused (conditions compose, but not without bound).
MAX_DEPTH: Final = 64

JsonPath = tuple[str | int, ...]


@dataclass(slots=True)
class SourceDoc:
    """A parsed document: its JSON value, its file name and the line of each node."""

    value: Any
    file: str
    lines: dict[JsonPath, int] = field(default_factory=dict)

    def line_of(self, path: JsonPath) -> int | None:
        """The line of ``path``, or of its closest ancestor that has one."""
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return None


def _fail(file: str, line: int | None, message: str, path: str = "") -> PolicyError:
    where = f"{file}:{line}" if line else file
    return PolicyError(
        f"{where}: {message}", code="policy_invalid", file=file, line=line, path=path
    )


class _Converter:
    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[JsonPath, int] = {}
        self.seen: set[int] = set()

    def convert(self, node: Node, path: JsonPath, depth: int) -> Any:
        line = node.start_mark.line + 1
        if depth > MAX_DEPTH:
            raise _fail(self.file, line, f"document nests deeper than {MAX_DEPTH} levels")
        if id(node) in self.seen:
            raise _fail(self.file, line, "yaml anchors and aliases are not supported; repeat it")
        self.seen.add(id(node))
        self.lines[path] = line
        if node.tag != _implicit_tag(node):
            # A tag says how to read what follows: on a collection it was dropped, and "!!str 42"
            # was read as the number. Policy text has one reading, the one JSON would give.
            raise _fail(
                self.file, line,
                f"unsupported yaml tag {node.tag!r}; write the value without a tag (quote it "
                "for a string)",
            )  # fmt: skip
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise _fail(
                        self.file, key_node.start_mark.line + 1, "mapping keys must be strings"
                    )
                key = str(key_node.value)
                if key == "<<":
                    raise _fail(self.file, line, "yaml merge keys ('<<') are not supported")
                if key in out:
                    raise _fail(
                        self.file,
                        key_node.start_mark.line + 1,
                        f"duplicate key {key!r}; each key may appear once",
                    )
                out[key] = self.convert(value_node, (*path, key), depth + 1)
            return out
        if isinstance(node, SequenceNode):
            return [self.convert(v, (*path, i), depth + 1) for i, v in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self._scalar(node)

    def _scalar(self, node: ScalarNode) -> Any:
        tag, text = node.tag, str(node.value)
        if tag == "tag:yaml.org,2002:null":
            return None
        if tag == "tag:yaml.org,2002:bool":
            low = text.lower()
            return low == "true" if low in ("true", "false") else text
        if tag == "tag:yaml.org,2002:int":
            if not _DECIMAL_INT.fullmatch(text):
                raise self._ambiguous(node, text)
            value = yaml.SafeLoader.construct_yaml_int(_CONSTRUCTOR, node)
            return int(value)
        if tag == "tag:yaml.org,2002:float":
            if ":" in text or "_" in text:
                raise self._ambiguous(node, text)
            return self._finite(
                node, float(yaml.SafeLoader.construct_yaml_float(_CONSTRUCTOR, node))
            )
        if tag == "tag:yaml.org,2002:str" and not node.style and _JSON_NUMBER.fullmatch(text):
            # YAML 1.1 wants a '.' in a float: 1e+16 and 1e-05 (as json.dumps writes them) would
            # stay strings, and an `in: [1e16]` deny would never match the number.
            if _DECIMAL_INT.fullmatch(text):
                return int(text)
            return self._finite(node, float(text))
        if tag in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:timestamp"):
            return text
        raise _fail(self.file, node.start_mark.line + 1, f"unsupported yaml tag {tag!r}")

    def _finite(self, node: ScalarNode, number: float) -> float:
        if number != number or number in (float("inf"), float("-inf")):
            raise _fail(self.file, node.start_mark.line + 1, "numbers must be finite")
        return number

    def _ambiguous(self, node: ScalarNode, text: str) -> PolicyError:
        return _fail(
            self.file,
            node.start_mark.line + 1,
            f"the number {text!r} reads differently in YAML 1.1 and JSON (octal, hex, binary, "
            "base 60 or with '_'); write it in decimal, or quote it for a string",
        )


#: A JSON number (RFC 8259 §6), and a plain decimal integer: the only numerals a policy may use.
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_DECIMAL_INT: Final = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_CONSTRUCTOR: Final = yaml.SafeLoader("")
#: libyaml's parser when PyYAML was built with it: the same node tree and marks, about ten times
#: faster than the pure-Python one (a 10,000-rule policy loads in seconds, not a minute).
_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


#: Brackets (``[``, ``{``) open at once that refuse a document before it is parsed: far above
#: :data:`MAX_DEPTH` (brackets inside quoted strings count too, so this bounds the nesting
#: from above), far below what crashes the composer. Block nesting needs indentation, which the
#: document size bounds to a depth the composer survives.
_MAX_FLOW_NESTING: Final = 1000
_BRACKETS: Final = re.compile(r"[\[\]{}]")


def _flow_nesting_exceeds(text: str, limit: int) -> bool:
    depth = 0
    for m in _BRACKETS.finditer(text):
        if m.group(0) in "[{":
            depth += 1
            if depth > limit:
                return True
        elif depth:
            depth -= 1
    return False


_RESOLVER: Final = yaml.SafeLoader("")


def _implicit_tag(node: Node) -> str:
    """The tag YAML gives ``node`` without one written: a map, a sequence, a quoted scalar's
    string, a plain scalar's by its text."""
    if isinstance(node, MappingNode):
        return "tag:yaml.org,2002:map"
    if isinstance(node, SequenceNode):
        return "tag:yaml.org,2002:seq"
    assert isinstance(node, ScalarNode)
    plain = not node.style
    return str(_RESOLVER.resolve(ScalarNode, node.value, (plain, not plain)))  # type: ignore[no-untyped-call]


def parse_source(text: str | bytes, file: str = "<policy>") -> SourceDoc:
    """Parse one YAML (or JSON) document; raise ``PolicyError(code="policy_invalid")``."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _fail(file, None, f"document is larger than {MAX_DOCUMENT_BYTES} bytes; split it")
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(file, None, "document is not utf-8 text") from exc
    if _flow_nesting_exceeds(source, _MAX_FLOW_NESTING):
        # libyaml's composer recurses in C: a few hundred thousand '[' crash the process before
        # the converter's depth check could refuse the document.
        raise _fail(file, None, f"document nests deeper than {MAX_DEPTH} levels")
    try:
        nodes = list(yaml.compose_all(source, Loader=_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise _fail(file, line, f"yaml syntax error: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise _fail(file, None, f"yaml syntax error: {exc}") from exc
    if len(nodes) != 1 or nodes[0] is None:
        raise _fail(file, None, "expected exactly one yaml document")
    conv = _Converter(file)
    value = conv.convert(nodes[0], (), 0)
    return SourceDoc(value=value, file=file, lines=conv.lines)
