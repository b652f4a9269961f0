"""The ``aegis/v1`` ``Policy`` document: the pydantic model that is the schema.

Every model forbids unknown fields and is strict about types (``"5000"`` is not a number, ``yes``
is not a boolean), because a policy that silently means something else is a wrong allow waiting to
happen. ``docs/policy-schema.json`` is generated from :class:`PolicyDocument`; whole-document
checks that need more than one field (duplicate ids, rules that can never match) live in
:mod:`aegis.policy.checks`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zoneinfo
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from aegis.policy.input import CREDENTIAL_HEADERS, fold_case, loose_path
from aegis.policy.safe_regex import RegexRejected, compile_safe

__all__ = [
    "API_VERSION",
    "INPUT_ROOTS",
    "KIND",
    "LEAF_OPERATORS",
    "MAX_GLOB_STARS",
    "MAX_RULES",
    "STORED",
    "Action",
    "AgentMatch",
    "Approval",
    "ChainMatch",
    "Condition",
    "DateRange",
    "HourRange",
    "Match",
    "Metadata",
    "Obligation",
    "PolicyDocument",
    "Rule",
    "Spec",
    "TimeWindow",
]

API_VERSION: Final = "aegis/v1"
KIND: Final = "Policy"
MAX_RULES: Final = 20_000
MAX_GLOB_STARS: Final = 3
#: The top-level keys of the input document (see :mod:`aegis.policy.input`); paths start here.
INPUT_ROOTS: Final = frozenset(
    {
        "tool",
        "resource",
        "method",
        "path",
        "path_loose",
        "tenant",
        "env",
        "agent",
        "token",
        "auth",
        "chain",
    }
    | {"request", "time"}
)
#: Operators that test the value at ``path``.
LEAF_OPERATORS: Final = (
    "eq", "ne", "in", "not_in", "contains", "lt", "lte", "gt", "gte", "regex", "exists",
)  # fmt: skip
_COMPOSITES: Final = ("all", "any", "not", "time")

Action = Literal["allow", "deny", "sanitize", "approval_needed"]
Number = StrictInt | StrictFloat
#: A name policy gives (an approver group, a channel): printable, no control character (a
#: newline would start another line of the generated Rego, or of a log).
Name = Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
#: An HTTP field name (RFC 9110 §5.1 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
NameList = Annotated[list[Name], Field(min_length=1, max_length=1000)]
_RULE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _bare_host(host: str) -> str:
    """``host[:port]`` as policy sees a host: lowercase, without port or trailing dot."""
    if host.startswith("["):
        return host.partition("]")[0].lower() + "]" if "]" in host else host.lower()
    name, colon, port = host.rpartition(":")
    if colon and port.isascii() and port.isdigit():
        host = name
    return host.lower().removesuffix(".")


def _loose_literal(path: str) -> str:
    """A path as a ``path_loose`` literal: its loose reading without a trailing ``/`` (a call
    with one is also decided without it, one without never with it)."""
    loose = loose_path(path)
    return loose[:-1] if len(loose) > 1 and loose.endswith("/") else loose


def _upper_outside_escapes(pattern: str) -> bool:
    """Whether a regex names a letter the case folding of the input changes (``A``, ``Σ``, the
    dotless i) itself, not in an escape (``\\D``, ``\\S`` ...)."""
    escaped = False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif fold_case(c) != c:
            return True
    return False


def _folds(pattern: str) -> bool:
    """Whether ``pattern`` holds text the loose readings change (NFKC): the input never holds
    ``refund`` in FULLWIDTH letters."""
    return not pattern.isascii() and unicodedata.normalize("NFKC", pattern) != pattern


def _needs_slash_end(pattern: str) -> bool:
    """Whether a test on ``path_loose`` looks for a ``/`` ending the path: a call with one is
    decided without it (Express serves both alike), and a call without one is decided with it
    only for deny rules, so an allow rule testing for it would never allow."""
    return any(end in pattern for end in ("/$", "/\\Z", "/\\z"))


#: Input paths whose values are canonical, each with its canonical form and how it reads.
_CANONICAL_PATHS: Final = {
    "path_loose": (
        _loose_literal,
        "the path as the loosest upstream reads it, without a trailing '/'",
    ),
    "method": (lambda m: m.strip().upper(), "the method in upper case"),
    "request.headers.host": (_bare_host, "the host lowercase, without port or trailing dot"),
    "request.headers.x-forwarded-host": (
        _bare_host,
        "the host lowercase, without port or trailing dot",
    ),
}
_HOST_PATHS: Final = frozenset({"request.headers.host", "request.headers.x-forwarded-host"})


def _ascii_hosts(path: str, values: list[Any]) -> None:
    """Refuse a non-ASCII host literal or pattern: the gateway admits only an ASCII ``Host``
    (an internationalised name is sent as its A-label, ``xn--bcher-kva.example``), so a rule on
    ``bücher.example`` would never match."""
    for value in values:
        if isinstance(value, str) and not value.isascii():
            try:
                label = value.encode("idna").decode("ascii")
            except UnicodeError:
                label = "its IDNA A-label (xn--...)"
            raise ValueError(
                f"{path} never holds {value[:128]!r}: a host is ASCII in policy input (a name "
                f"outside ASCII arrives as its A-label); write {label[:128]!r}"
            )


_PATH = re.compile(r"^[A-Za-z0-9_$@:-]+(\.[A-Za-z0-9_$@:*-]+)*$")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$")
_DATE = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")


#: The validation context of a stored policy read back (``aegis.policy.store``): it loaded once,
#: and a check added since that would refuse it now (a rule that never matches) must not make
#: the active policy unloadable, every call of its tenant a 503. ``aegis policy check`` and a
#: new put still apply every check.
STORED: Final = {"stored": True}


def _checking(info: ValidationInfo) -> bool:
    """Whether the load-time checks of rules that can never match apply (not to stored ones)."""
    return not (info.context or {}).get("stored")


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_by_name=False, validate_by_alias=True
    )


def _check_globs(values: list[str] | None) -> list[str] | None:
    for glob in values or ():
        if glob.count("*") > MAX_GLOB_STARS:
            raise ValueError(f"glob {glob!r} has more than {MAX_GLOB_STARS} '*'; simplify it")
    return values


class HourRange(_Strict):
    """Local wall-clock hours, ``start`` inclusive and ``end`` exclusive (``"24:00"`` allowed)."""

    start: StrictStr = Field(examples=["08:00"])
    end: StrictStr = Field(examples=["18:00"])

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.fullmatch(v):
            raise ValueError(f"hour {v!r} must be HH:MM between 00:00 and 24:00")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> HourRange:
        if self.start >= self.end:
            raise ValueError("hours.start must be before hours.end; for a window past midnight "
                             "use 'any' with two windows")  # fmt: skip
        return self


class DateRange(_Strict):
    """Local calendar dates ``YYYY-MM-DD``, both ends inclusive."""

    start: StrictStr | None = None
    end: StrictStr | None = None

    @field_validator("start", "end")
    @classmethod
    def _date(cls, v: str | None) -> str | None:
        if v is not None and not _DATE.fullmatch(v):
            raise ValueError(f"date {v!r} must be YYYY-MM-DD")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.start is None and self.end is None:
            raise ValueError("dates needs start, end or both")
        if self.start and self.end and self.start > self.end:
            raise ValueError("dates.start must not be after dates.end")
        # A call at 2100-01-01T00:00:00Z or later is a rule error (policy.ir.MAX_UNIX); the first
        # local day of 2100 is still reached east of UTC.
        if self.start and self.start > "2100-01-01":
            raise ValueError(
                f"dates.start {self.start} is never reached: a time window decides calls made "
                "before 2100 only; write an earlier date"
            )
        return self


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@functools.cache
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "Factory", "posixrules"}


class TimeWindow(_Strict):
    """True when ``input.time.unix``, seen in time zone ``tz``, falls inside every given part."""

    tz: StrictStr = Field(default="UTC", description="IANA time zone name, e.g. Europe/London")
    weekdays: Annotated[list[Weekday], Field(min_length=1, max_length=7)] | None = None
    hours: HourRange | None = None
    dates: DateRange | None = None

    @field_validator("tz")
    @classmethod
    def _zone(cls, v: str) -> str:
        # Only names of the IANA database: ZoneInfo also opens any file of the system's zoneinfo
        # directory ("localtime" is this host's own setting, "right/..." counts leap seconds),
        # which Rego engines cannot read and which decide differently from host to host.
        try:
            if v not in _iana_zones():
                raise ValueError(v)
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r}; use an IANA name such as Europe/London"
            ) from exc
        return v

    @model_validator(mode="after")
    def _some(self) -> TimeWindow:
        if self.weekdays is None and self.hours is None and self.dates is None:
            raise ValueError("a time window needs weekdays, hours or dates")
        return self


class Condition(_Strict):
    """Exactly one operator: a test of the value at ``path``, a time window, or a composition."""

    path: StrictStr | None = Field(default=None, description="dotted path into the input document")
    eq: JsonValue = None
    ne: JsonValue = None
    in_: Annotated[list[JsonValue], Field(min_length=1, max_length=10_000)] | None = Field(
        default=None, alias="in"
    )
    not_in: Annotated[list[JsonValue], Field(min_length=1, max_length=10_000)] | None = None
    contains: StrictStr | None = None
    lt: Number | None = None
    lte: Number | None = None
    gt: Number | None = None
    gte: Number | None = None
    regex: StrictStr | None = None
    exists: StrictBool | None = None
    time: TimeWindow | None = None
    all_: Annotated[list[Condition], Field(min_length=1)] | None = Field(default=None, alias="all")
    any_: Annotated[list[Condition], Field(min_length=1)] | None = Field(default=None, alias="any")
    not_: Condition | None = Field(default=None, alias="not")

    @property
    def operator(self) -> str:
        """The one operator this condition uses (its alias: ``in``, ``all``, ``not`` ...)."""
        names = [self._alias(n) for n in self.model_fields_set if n != "path"]
        return names[0]

    @staticmethod
    def _alias(name: str) -> str:
        return name.rstrip("_")

    @property
    def operand(self) -> Any:
        return getattr(self, {"in": "in_", "all": "all_", "any": "any_", "not": "not_"}.get(
            self.operator, self.operator))  # fmt: skip

    @model_serializer(mode="wrap")
    def _keep_null_operand(self, handler: SerializerFunctionWrapHandler) -> Any:
        # ``eq: null`` is a real test; dumping with exclude_none must not erase the operator.
        data = handler(self)
        if isinstance(data, dict) and self.operator in ("eq", "ne") and self.operand is None:
            data[self.operator] = None
        return data

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not _PATH.fullmatch(v) or "*" in v:
            raise ValueError(f"path {v!r} must be dotted keys such as request.body.amount")
        if v.split(".")[0] not in INPUT_ROOTS:
            roots = ", ".join(sorted(INPUT_ROOTS))
            raise ValueError(f"path {v!r} must start with one of: {roots}")
        parts = v.split(".")
        if (
            parts[:2] == ["request", "headers"]
            and len(parts) > 2
            and parts[2] in CREDENTIAL_HEADERS
            and _checking(info)
        ):
            raise ValueError(
                f"path {v!r}: policy never sees the {parts[2]} header (credentials are removed "
                "from its input); a rule on it would never match"
            )
        if parts[:2] == ["request", "headers"] and len(parts) > 2:
            name = parts[2]
            if name != name.lower() or "_" in name:
                # Input header names are lowercase as received: X-Account would never match,
                # and x_account is x-account to CGI and WSGI servers.
                fixed = name.lower().replace("_", "-")
                raise ValueError(
                    f"path {v!r}: header names are lowercase with '-' in policy input; write "
                    f"request.headers.{fixed}"
                )
        return v

    @model_validator(mode="after")
    def _safe_integers(self, info: ValidationInfo) -> Condition:
        # A body integer beyond 2**53 is refused before policy reads it (readers that hold
        # numbers as doubles read it as another): a literal beyond it would never match.
        if not _checking(info):
            return self
        stack: list[Any] = [self.eq, self.ne, *(self.in_ or ()), *(self.not_in or ()), self.lt,
                             self.lte, self.gt, self.gte]  # fmt: skip
        while stack:  # literals nest (a list or an object compared whole)
            value = stack.pop()
            if isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
                raise ValueError(
                    f"the integer {value} is beyond +-2**53, which JSON readers that hold numbers "
                    "as doubles cannot tell from its neighbours; a body never holds it"
                )
        return self

    @model_validator(mode="after")
    def _literals_it_can_hold(self, info: ValidationInfo) -> Condition:
        # A literal the input never holds would make a deny rule on it pass every call.
        if not _checking(info):
            return self
        if self.path not in _CANONICAL_PATHS:
            return self
        if self.path == "method" and (self.regex is not None or self.contains is not None):
            raise ValueError(
                "test the method with eq, in or the methods selector, where GET names HEAD too "
                "(servers answer HEAD with the GET handler)"
            )
        canonical, how = _CANONICAL_PATHS[self.path]
        pattern = self.contains if self.contains is not None else self.regex
        literals = [self.eq, self.ne, *(self.in_ or ()), *(self.not_in or ())]
        if self.path in _HOST_PATHS:
            _ascii_hosts(self.path, [pattern, *literals])
        if pattern is not None and (
            (self.contains is not None and fold_case(self.contains) != self.contains)
            or (self.regex is not None and _upper_outside_escapes(self.regex))
            or _folds(pattern)
            or (self.path == "path_loose" and (";" in pattern or _needs_slash_end(pattern)))
            or (self.path != "path_loose" and ":" in pattern)
        ):
            raise ValueError(
                f"{self.path} never holds what {pattern[:128]!r} looks for: it is {how}; "
                "test it in that form"
            )
        for value in literals:
            if not isinstance(value, str):
                continue
            fixed = value
            for _ in range(8):  # to a form that reads as itself: "a.example.." is a.example
                if canonical(fixed) == fixed:
                    break
                fixed = canonical(fixed)
            if self.path == "path_loose" and "//" in fixed:
                raise ValueError(
                    f"path_loose never holds {value[:128]!r}: a path with empty, '.' or '..' "
                    "segments is refused before policy reads it"
                )
            if fixed != value:
                raise ValueError(
                    f"{self.path} never holds {value[:128]!r}: it is {how}; write {fixed[:128]!r}"
                )
        return self

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                compile_safe(v)
            except RegexRejected as exc:
                raise ValueError(str(exc)) from exc
        return v

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        ops = sorted(self._alias(n) for n in self.model_fields_set if n != "path")
        if len(ops) != 1:
            found = ", ".join(ops) or "none"
            raise ValueError(
                f"a condition needs exactly one operator, found {found}; "
                "combine several with 'all' or 'any'"
            )
        op = ops[0]
        if self.operand is None and op not in ("eq", "ne"):
            # `exists:` with no value reads as null in YAML: an operator without an operand
            # would test nothing (or crash the evaluator, or read differently in Rego).
            raise ValueError(f"operator {op!r} needs a value (only eq and ne may test null)")
        if op in LEAF_OPERATORS and self.path is None:
            raise ValueError(f"operator {op!r} needs a 'path'")
        if op in _COMPOSITES and self.path is not None:
            raise ValueError(f"operator {op!r} takes no 'path'")
        return self


class AgentMatch(_Strict):
    ids: NameList | None = None
    roles: NameList | None = Field(default=None, description="matches when the agent has any")
    attributes: dict[Name, JsonValue] | None = Field(
        default=None, description="each attribute must equal the given value"
    )


class ChainMatch(_Strict):
    parents: NameList | None = Field(default=None, description="the immediate parent agent id")
    origin_users: NameList | None = None
    min_depth: Annotated[StrictInt, Field(ge=0, le=64)] | None = None
    max_depth: Annotated[StrictInt, Field(ge=0, le=64)] | None = None

    @model_validator(mode="after")
    def _depths(self) -> ChainMatch:
        if None not in (self.min_depth, self.max_depth) and self.min_depth > self.max_depth:  # type: ignore[operator]
            raise ValueError("chain.min_depth is above chain.max_depth; the rule can never match")
        return self


class Match(_Strict):
    """Cheap selectors, all of which must hold. Lists match when the input value is any of them."""

    tools: NameList | None = Field(default=None, description="tool names or globs ('*')")
    resources: NameList | None = Field(default=None, description="resource names or globs ('*')")
    methods: NameList | None = None
    tenants: NameList | None = None
    envs: NameList | None = None
    agent: AgentMatch | None = None
    scopes: NameList | None = Field(default=None, description="every scope must be granted")
    auth_methods: Annotated[list[Literal["mtls", "dpop", "bearer"]], Field(min_length=1)] | None = (
        None
    )
    chain: ChainMatch | None = None

    _globs = field_validator("tools", "resources")(_check_globs)

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        for m in v or ():
            if m != m.strip() or not m.strip():
                # "POST " would never match a call, so a deny on it would never fire.
                raise ValueError(f"method {m[:32]!r} holds spaces; write {m.strip().upper()!r}")
        return [m.upper() for m in v] if v else v


class Obligation(_Strict):
    """One sanitization step applied by the gateway to the request or the response."""

    kind: Literal["redact", "mask", "drop_header"]
    target: Literal["request", "response"]
    path: StrictStr | None = Field(default=None, description="redact: dotted body path, '*' any")
    pattern: Literal["email", "card_number", "secret"] | None = Field(
        default=None, description="mask: a built-in pattern"
    )
    header: StrictStr | None = Field(default=None, description="drop_header: header name")

    @model_validator(mode="after")
    def _fields(self) -> Obligation:
        need = {"redact": "path", "mask": "pattern", "drop_header": "header"}[self.kind]
        given = {f for f in ("path", "pattern", "header") if getattr(self, f) is not None}
        if given != {need}:
            raise ValueError(f"a {self.kind} obligation takes exactly '{need}'")
        if self.path is not None and not _PATH.fullmatch(self.path):
            raise ValueError(
                f"redact path {self.path!r} must be dotted keys such as customer.email"
            )
        return self

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN.fullmatch(v):
            raise ValueError(f"header {v[:64]!r} is not an HTTP field name (RFC 9110 token)")
        return v.lower() if v is not None else v


class Approval(_Strict):
    group: Name = Field(description="the approver group that must approve")
    channel: Name = Field(default="default", description="where the request is sent")
    expires_in: Annotated[StrictInt, Field(ge=60, le=7 * 86400)] = Field(
        default=3600, description="seconds before an unanswered request expires (denied)"
    )


class Rule(_Strict):
    id: StrictStr = Field(description="unique, lowercase: [a-z0-9][a-z0-9._-]{0,63}")
    description: StrictStr = ""
    action: Action
    reason: Annotated[StrictStr, Field(min_length=1, max_length=512)] | None = Field(
        default=None, description="listed in the decision when this rule decides"
    )
    shadow: StrictBool = Field(default=False, description="evaluate and record, never enforce")
    match: Match = Field(default_factory=Match)
    when: Condition | None = None
    obligations: Annotated[list[Obligation], Field(min_length=1)] | None = None
    approval: Approval | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _RULE_ID.fullmatch(v):
            raise ValueError(f"rule id {v!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
        return v

    @model_validator(mode="after")
    def _action_fields(self) -> Rule:
        if (self.action == "sanitize") != (self.obligations is not None):
            raise ValueError("'obligations' is required for, and only allowed on, sanitize rules")
        if (self.action == "approval_needed") != (self.approval is not None):
            raise ValueError(
                "'approval' is required for, and only allowed on, approval_needed rules"
            )
        return self

    @property
    def effective_reason(self) -> str:
        return self.reason or f"{self.action} by rule {self.id}"


class Metadata(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    description: StrictStr = ""
    labels: dict[Name, StrictStr] = Field(default_factory=dict)


class Spec(_Strict):
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="shadow: every call is allowed and the would-be decision is recorded",
    )
    rules: Annotated[list[Rule], Field(min_length=1, max_length=MAX_RULES)]


class PolicyDocument(_Strict):
    """An Aegis policy: ``apiVersion: aegis/v1``, ``kind: Policy``."""

    api_version: Literal["aegis/v1"] = Field(alias="apiVersion")
    kind: Literal["Policy"]
    metadata: Metadata
    spec: Spec

    def canonical(self) -> dict[str, Any]:
        """The validated document as plain JSON, defaults filled in (what versions hash)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
