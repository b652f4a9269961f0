"""Policy evaluation cost: the in-process evaluator against regorus, and against rule count.

1. The reference policy (``examples/policies/payments.yaml``) on a mix of calls (small payment,
   large payment, bad account, CRM, finance via orchestrator), evaluated by the in-process
   evaluator and by regorus (Rego v1) loaded with the generated bundle, in the same run. Goal: the
   in-process evaluator at least 5x faster at p50. regorus is timed on evaluation only, with the
   input already serialised (its fastest path); the in-process figure includes everything.
2. Policies of 10, 100, 1,000 and 10,000 rules (one exact-tool rule per tool, plus a tenth as
   glob rules), evaluating a call to one indexed tool. Goal: cost within 2x from 10 to 10,000.

Latencies are per call in microseconds (p50 / p99 of batches of ``--batch`` calls).

    .venv/bin/python bench/bench_policy.py [--seconds 2] [--batch 200]    (quick: --seconds 0.5)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import regorus

from aegis.policy.evaluator import CompiledPolicy, compile_policy
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.loader import load_document, load_file
from aegis.policy.rego import DECISION_QUERY, data_document, to_rego

ROOT = Path(__file__).resolve().parent.parent
WEDNESDAY_10_LONDON = 1_736_935_200
CALLS: list[dict[str, Any]] = [
    {
        "tool": "payments.transfer",
        "scopes": ["payments:write"],
        "body": {"amount": 120, "account": "GB1234567890"},
    },
    {
        "tool": "payments.transfer",
        "scopes": ["payments:write"],
        "body": {"amount": 9000, "account": "GB1234567890"},
    },
    {
        "tool": "payments.transfer",
        "scopes": ["payments:write"],
        "body": {"amount": 10, "account": "bad"},
    },
    {"tool": "crm.contacts.get"},
    {"tool": "finance.ledger.read", "chain": {"agents": ["orchestrator"]}},
]


def _time(fn: Callable[[], object], seconds: float, batch: int) -> tuple[float, float]:
    """(p50, p99) microseconds per call, measured over batches for ``seconds``."""
    for _ in range(batch):  # warm caches
        fn()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 20:
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter_ns() - start) / batch / 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def _cycle(items: list[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return nxt


def reference(seconds: float, batch: int) -> None:
    policy = compile_policy(load_file(ROOT / "examples" / "policies" / "payments.yaml"))
    docs = [build_input(call_from_dict({**c, "time": WEDNESDAY_10_LONDON})) for c in CALLS]
    engine = regorus.Engine()
    engine.add_policy("policy.rego", to_rego(policy))
    engine.add_data_json(json.dumps(data_document(policy)))
    encoded = [json.dumps(d) for d in docs]
    for doc, text in zip(docs, encoded, strict=True):  # the two engines must agree here too
        engine.set_input_json(text)
        theirs = json.loads(engine.eval_rule_as_json(DECISION_QUERY))
        assert theirs["action"] == policy.evaluate(doc).action

    next_doc, next_text = _cycle(docs), _cycle(encoded)

    def ours() -> object:
        return policy.evaluate(next_doc())

    def rego() -> object:
        engine.set_input_json(next_text())
        return engine.eval_rule_as_json(DECISION_QUERY)

    p50, p99 = _time(ours, seconds, batch)
    r50, r99 = _time(rego, seconds, max(1, batch // 10))
    print("reference policy (payments.yaml, 8 rules, mixed calls)")
    print(f"  in-process evaluator  p50 {p50:8.2f} us   p99 {p99:8.2f} us")
    print(f"  regorus (Rego v1)     p50 {r50:8.2f} us   p99 {r99:8.2f} us")
    print(
        f"  ratio regorus/in-process: p50 {r50 / p50:6.1f}x   p99 {r99 / p99:6.1f}x   (goal >= 5x)"
    )


def _sized(n: int) -> CompiledPolicy:
    rules = []
    for i in range(n):
        rules.append(
            {
                "id": f"r{i}",
                "action": "allow" if i % 7 else "deny",
                "match": {"tools": [f"svc{i}.call"], "scopes": ["s:call"]},
                "when": {"path": "request.body.amount", "lte": 1000 + i},
            }
        )
    for i in range(max(1, n // 10)):
        rules.append({"id": f"g{i}", "action": "deny", "match": {"tools": [f"other{i}.*"]}})
    doc = {
        "apiVersion": "aegis/v1",
        "kind": "Policy",
        "metadata": {"name": f"n{n}"},
        "spec": {"rules": rules},
    }
    return compile_policy(load_document(json.dumps(doc)))


def scaling(seconds: float, batch: int) -> None:
    """Every size is timed in turn, round after round, so all four see the same machine state (the
    CPU is shared; a size measured alone in a noisy moment would skew the ratio)."""
    print("rule count, one indexed tool (p50 / p99 us per evaluation, interleaved)")
    sizes = (10, 100, 1_000, 10_000)
    doc = build_input(
        call_from_dict(
            {"tool": "svc5.call", "scopes": ["s:call"], "body": {"amount": 3}, "time": 0}
        )
    )
    policies = {n: _sized(n) for n in sizes}
    for policy in policies.values():
        assert policy.evaluate(doc).rule_ids == ("r5",)
        for _ in range(batch):  # warm the candidate cache
            policy.evaluate(doc)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    end = time.perf_counter() + seconds * 2
    while time.perf_counter() < end or len(samples[10]) < 20:
        for n in sizes:
            evaluate = policies[n].evaluate
            start = time.perf_counter_ns()
            for _ in range(batch):
                evaluate(doc)
            samples[n].append((time.perf_counter_ns() - start) / batch / 1000)
    base = statistics.median(samples[10])
    for n in sizes:
        got = sorted(samples[n])
        p50, p99 = statistics.median(got), got[min(len(got) - 1, int(len(got) * 0.99))]
        print(
            f"  {n:6d} rules   p50 {p50:7.2f}   p99 {p99:7.2f}   ratio vs 10 rules {p50 / base:5.2f}x"
        )
    print("  (goal: 10,000-rule ratio within 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--batch", type=int, default=200, help="calls per timed batch")
    args = parser.parse_args()
    reference(args.seconds, args.batch)
    scaling(args.seconds, args.batch)


if __name__ == "__main__":
    main()
