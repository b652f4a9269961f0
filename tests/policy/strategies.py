"""Hypothesis strategies for policy calls, biased towards the literals a policy tests.

Purely random inputs almost never hit ``amount <= 5000`` or a tool glob, so each strategy is seeded
with the policy's own literals (and neighbours of its numbers), then mixes in values of every JSON
type so that type mismatches, missing paths and near misses are all exercised; each literal also
brings the values of other types an upstream would read as it (``"42"`` for 42, ``1`` for true).
"""

from __future__ import annotations

import math
from typing import Any, Final

from hypothesis import strategies as st

from aegis.policy.evaluator import CompiledPolicy
from aegis.policy.input import AgentInfo, ChainInfo, PolicyCall
from aegis.policy.ir import Leaf, leaves

_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], max_codepoint=0x2FF), max_size=12)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10_000_000, 10_000_000),
    st.floats(-1e7, 1e7, allow_nan=False, allow_infinity=False).map(lambda f: round(f, 3)),
    _TEXT,
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "x"]), inner, max_size=3),
    ),
    max_leaves=6,
)
#: 2024-01-01 to 2027-01-01, plus the edges a time window must refuse or accept.
_TIMES = st.one_of(st.integers(1_704_067_200, 1_798_761_600), st.sampled_from([0, 1_735_689_600]))


def _glob_examples(glob: str) -> st.SearchStrategy[str]:
    parts = glob.split("*")
    return st.lists(
        st.sampled_from(["", "x", "a.b", "admin", "é"]),
        min_size=len(parts) - 1,
        max_size=len(parts) - 1,
    ).map(
        lambda fills: "".join(p + (fills[i] if i < len(fills) else "") for i, p in enumerate(parts))
    )


def _converted(value: Any) -> list[Any]:
    """What an upstream binding JSON would read as ``value`` (Jackson: ``"42"`` for 42, ``1`` and
    ``"true"`` for true, 42 for ``"42"``): each is a scalar of another type, a rule error."""
    if isinstance(value, bool):
        return [int(value), str(value).lower()]
    if isinstance(value, int | float):
        return [str(value), *([bool(value)] if value in (0, 1) else [])]
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "false"):
            return [text == "true"]
        try:
            number = float(text)
        except ValueError:
            return []
        return [int(number) if number.is_integer() else number] if math.isfinite(number) else []
    return []


def _near(value: Any) -> list[Any]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [value, *_converted(value)]
    return [value, value - 1, value + 1, value + 0.5, value - 0.01, *_converted(value)]


def _literals(policy: CompiledPolicy) -> dict[tuple[str, ...], list[Any]]:
    found: dict[tuple[str, ...], list[Any]] = {}
    all_leaves: list[Leaf] = []
    for rule in policy.lowered.rules:
        all_leaves.extend(rule.match)
        if rule.tool_leaf:
            all_leaves.append(rule.tool_leaf)
        if rule.when is not None:
            all_leaves.extend(leaves(rule.when))
    for leaf in all_leaves:
        values = found.setdefault(leaf.path, [])
        if leaf.op in ("in", "not_in", "intersects", "glob"):
            for v in leaf.value:
                values.extend(_near(v))
        elif leaf.op == "regex":
            values.extend(
                [
                    "GB1234567890",
                    "gb1234567890",
                    "GB12345678901",
                    "abc",
                    "a\nc",
                    "deadbeef-0a1b",
                    "drop  table x",
                    "éé",
                    "x" * 4097,
                ]
            )
        elif leaf.op not in ("exists", "time"):
            values.extend(_near(leaf.value))
    return found


def _value_for(literals: list[Any]) -> st.SearchStrategy[Any]:
    if not literals:
        return _JSON
    return st.one_of(st.sampled_from(literals), st.sampled_from(literals), _JSON)


#: ASCII letters to their FULLWIDTH forms (NFKC folds them back).
_FULLWIDTH: Final = {c: c + 0xFEE0 for c in range(ord("a"), ord("z") + 1)}


def calls(policy: CompiledPolicy) -> st.SearchStrategy[PolicyCall]:
    """Calls that exercise ``policy``: its tools, selectors and condition paths."""
    lit = _literals(policy)
    globs = [g for r in policy.lowered.rules for g in (r.tools or ())]
    tools = st.one_of(*(_glob_examples(g) for g in globs), _TEXT) if globs else _TEXT
    names = st.sampled_from(["orchestrator", "planner", "helper", "researcher", "writer", "x"])

    def strings(path: tuple[str, ...], extra: list[str]) -> st.SearchStrategy[str]:
        pool = [v for v in lit.get(path, []) if isinstance(v, str)] + extra
        return st.sampled_from(pool) if pool else _TEXT

    def nested(prefix: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
        subpaths = [
            p[len(prefix) :] for p in lit if p[: len(prefix)] == prefix and len(p) > len(prefix)
        ]
        if not subpaths:
            return st.dictionaries(st.sampled_from(["a", "b"]), _JSON, max_size=2)

        def build(choices: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for sub, value in choices:
                node = out
                for key in sub[:-1]:
                    nxt = node.get(key)
                    if not isinstance(nxt, dict):
                        nxt = node[key] = {}
                    node = nxt
                node[sub[-1]] = value
            return out

        pairs = st.sampled_from(subpaths).flatmap(
            lambda sub: st.tuples(st.just(sub), _value_for(lit.get(prefix + sub, [])))
        )
        return st.lists(pairs, max_size=len(subpaths) + 1).map(build)

    agent = st.builds(
        AgentInfo,
        id=strings(("agent", "id"), ["researcher", "writer", "agent-1"]),
        roles=st.lists(strings(("agent", "roles"), ["reader", "editor", "admin"]), max_size=2).map(
            tuple
        ),
        attributes=nested(("agent", "attributes")),
    )
    chain = st.builds(
        ChainInfo,
        agents=st.lists(names, max_size=4).map(tuple),
        origin_user=st.one_of(st.none(), st.sampled_from(["alice", "mallory"])),
        origin_iss=st.one_of(st.none(), st.sampled_from(["https://idp", "https://partner"])),
    )
    query = nested(("request", "query")).map(
        lambda q: {k: v if isinstance(v, str) else str(v) for k, v in q.items()}
    )
    headers = nested(("request", "headers")).map(lambda h: {k: str(v) for k, v in h.items()})
    # Paths the rules name (as received or loose), in the spellings a loose upstream serves
    # alike: case, ;parameters, a trailing dot, fullwidth letters.
    named = [v for key in (("path",), ("path_loose",)) for v in lit.get(key, [])]
    bases = [v for v in named if isinstance(v, str) and v.startswith("/")] + ["/", "/payments/x"]
    spellings = {
        form
        for p in bases
        for form in (p, p.upper(), p.title(), p + ";v=1", p + ".", p + "/sub", p + "istrators",
                     p.translate(_FULLWIDTH))
    }  # fmt: skip
    path = st.sampled_from(sorted(spellings))
    return st.builds(
        PolicyCall,
        tool=tools,
        agent=agent,
        tenant=strings(("tenant",), ["acme", "initech"]),
        env=strings(("env",), ["prod", "dev"]),
        time=_TIMES,
        resource=st.one_of(
            st.none(), strings(("resource",), ["docs/a/public", "secret/x", "wiki/home"])
        ),
        method=strings(("method",), ["GET", "POST", "DELETE", "get"]),
        path=path,
        scopes=st.lists(
            strings(("token", "scopes"), ["kb:read", "kb:write", "payments:write"]), max_size=3
        ).map(tuple),
        auth_method=st.sampled_from(["mtls", "dpop", "bearer"]),
        chain=chain,
        body=st.one_of(nested(("request", "body")), nested(("request", "body")), _JSON),
        query=query,
        headers=headers,
    )
