"""Per-step latency histograms recorded once per call (Prometheus histogram exposition).

The decision pipeline times eight steps on every call. Eight ``prometheus_client`` histogram
observations cost about ten microseconds a call (a lock and two counters each), a measurable share
of a pipeline whose non-cryptographic work is a few tens of microseconds. :class:`StepHistogram`
keeps the same buckets and exposes the same ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``
series with a ``step`` label, but a call records all of its step times under one lock acquisition.
It is a custom collector registered with the process registry, so ``/metrics`` serves it with
every other metric.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

__all__ = ["StepHistogram"]


class StepHistogram(Collector):
    """One histogram per named step; :meth:`record` takes ``(step index, seconds)`` pairs."""

    def __init__(
        self,
        name: str,
        documentation: str,
        steps: Sequence[str],
        buckets: Sequence[float],
        *,
        registry: CollectorRegistry,
    ) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("buckets must be strictly increasing")
        self._name, self._doc = name, documentation
        self.steps = tuple(steps)
        self._bounds = tuple(float(b) for b in buckets)
        # Per step: a count per bucket (the last one is +Inf), not cumulative; and the sum.
        self._counts = [[0] * (len(self._bounds) + 1) for _ in self.steps]
        self._sums = [0.0] * len(self.steps)
        self._lock = threading.Lock()
        registry.register(self)

    def index(self, step: str) -> int:
        return self.steps.index(step)

    def record(self, times: Iterable[tuple[int, float]]) -> None:
        """Add one observation per ``(step index, seconds)`` pair (a value equal to a bucket's
        upper bound falls in that bucket, as Prometheus's ``le`` says)."""
        bounds, counts, sums = self._bounds, self._counts, self._sums
        with self._lock:
            for i, seconds in times:
                counts[i][bisect_left(bounds, seconds)] += 1
                sums[i] += seconds

    def sum(self, step: str) -> float:
        """Seconds observed so far for ``step``."""
        with self._lock:
            return self._sums[self.index(step)]

    def count(self, step: str) -> int:
        with self._lock:
            return sum(self._counts[self.index(step)])

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._doc, labels=["step"])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts = [list(c) for c in self._counts]
            sums = list(self._sums)
        family = HistogramMetricFamily(self._name, self._doc, labels=["step"])
        # Bucket bounds formatted as prometheus_client formats its own (0.0005 -> "0.0005").
        edges = [*(floatToGoString(b) for b in self._bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for step, per_bucket, total in zip(self.steps, counts, sums, strict=True):
            cumulative, running = [], 0
            for edge, n in zip(edges, per_bucket, strict=True):
                running += n
                cumulative.append((edge, float(running)))
            family.add_metric([step], cumulative, sum_value=total)
        yield family
