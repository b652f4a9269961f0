"""The per-step histogram collector: the same exposition a prometheus_client Histogram gives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aegis.telemetry.steps import StepHistogram

BUCKETS = (0.0001, 0.001, 0.01, 1.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_buckets_are_cumulative_and_a_bound_is_inclusive() -> None:
    registry = CollectorRegistry()
    h = StepHistogram("t_seconds", "doc", ("a", "b"), BUCKETS, registry=registry)
    h.record([(0, 0.001), (1, 0.5)])  # 0.001 is on a bound: it falls in le="0.001"
    h.record([(0, 2.0)])
    got = _samples(registry)
    assert got[("t_seconds_bucket", (("le", "0.0001"), ("step", "a")))] == 0
    assert got[("t_seconds_bucket", (("le", "0.001"), ("step", "a")))] == 1
    assert got[("t_seconds_bucket", (("le", "1.0"), ("step", "a")))] == 1
    assert got[("t_seconds_bucket", (("le", "+Inf"), ("step", "a")))] == 2
    assert got[("t_seconds_count", (("step", "a"),))] == 2
    assert got[("t_seconds_sum", (("step", "a"),))] == pytest.approx(2.001)
    assert got[("t_seconds_bucket", (("le", "0.01"), ("step", "b")))] == 0
    assert got[("t_seconds_bucket", (("le", "1.0"), ("step", "b")))] == 1
    assert h.sum("b") == pytest.approx(0.5)
    assert h.count("a") == 2


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        StepHistogram("t2", "doc", ("a",), (0.1, 0.01), registry=CollectorRegistry())


@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 10, allow_nan=False)), max_size=40))
def test_same_exposition_as_a_prometheus_histogram(observations: list[tuple[int, float]]) -> None:
    steps = ("x", "y", "z")
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = StepHistogram("s_seconds", "doc", steps, BUCKETS, registry=ours)
    ref = Histogram("s_seconds", "doc", ["step"], buckets=BUCKETS, registry=theirs)
    for step in steps:
        ref.labels(step)  # every step is exposed, observed or not
    h.record(observations)
    for i, seconds in observations:
        ref.labels(steps[i]).observe(seconds)
    mine, reference = _samples(ours), _samples(theirs)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value), key
