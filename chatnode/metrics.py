"""Process metrics on ``prometheus_client``, one :class:`~prometheus_client.CollectorRegistry`
per node (never the process-global default one: tests run several nodes in one process).

Two kinds of metric live here:

* **Owned** counters and histograms that the event loop updates directly
  (``metrics.acks.inc()``, ``metrics.errors.inc("not_found")``,
  ``metrics.commit_seconds.observe(s)``);
* **Readings**: values another component keeps (its typed stats, a queue length), read when
  ``GET /metrics`` is scraped through :meth:`Metrics.gauge`, :meth:`Metrics.value` and
  :meth:`Metrics.labeled`. A reading that returns None is absent (its component is not
  running: standalone, no Kafka); one that raises is logged and left out of that scrape.

``GET /metrics`` serves :meth:`Metrics.render` as :data:`CONTENT_TYPE` (text format 0.0.4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "Kind", "LabeledCounter", "Metrics", "Reading"]

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # what render() writes
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Gauges named like the family of an owned counter (``chatnode_connections`` open now, next
# to ``chatnode_connections_total`` accepted): the text format tells them apart, but the
# registry, which checks names the OpenMetrics way, would refuse them. Kept for the
# dashboards that read them; registered without the duplicate check.
_SHADOWED: Final = frozenset({"chatnode_connections"})

Kind = Literal["counter", "gauge"]
Labels = tuple[str, ...]


class LabeledCounter:
    """A counter with one label, incremented by label value: ``errors.inc("not_found")``."""

    __slots__ = ("_children", "_counter")

    def __init__(self, name: str, help: str, label: str, registry: CollectorRegistry) -> None:
        self._counter = Counter(name, help, (label,), registry=registry)
        self._children: dict[str, Counter] = {}  # labels() costs more than the inc itself

    def inc(self, key: str, n: float = 1.0) -> None:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(key)
        child.inc(n)


class Reading:
    """One metric family whose values are read at scrape time (a custom collector).

    ``read`` returns the value (no labels), or a mapping from label values (a tuple, one per
    name in ``labels``) to values; None when there is nothing to expose right now.
    """

    __slots__ = ("help", "kind", "labels", "name", "read")

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], float | Mapping[Labels, float] | None],
        *,
        kind: Kind = "gauge",
        labels: Sequence[str] = (),
    ) -> None:
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self.name = name
        self.help = help
        self.read = read
        self.kind = kind
        self.labels = tuple(labels)

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.read()
        except Exception:
            log.exception("reading metric %s failed", self.name)
            return
        if values is None:
            return
        family = self._family()
        if isinstance(values, Mapping):
            for key in sorted(values):
                if len(key) != len(self.labels):
                    raise ValueError(f"{self.name}: labels {key!r} do not match {self.labels}")
                family.add_metric(list(key), values[key])
        elif self.labels:
            raise ValueError(f"{self.name}: a labeled reading must return a mapping")
        else:
            family.add_metric([], values)
        yield family


class _Unchecked:
    """A reading registered without names, so the registry does not check them."""

    __slots__ = ("reading",)

    def __init__(self, reading: Reading) -> None:
        self.reading = reading

    def collect(self) -> Iterator[Metric]:
        return self.reading.collect()


class Metrics:
    """Every metric of a node, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux /proc)
        ProcessCollector(registry=reg)
        self.connections_total = Counter(
            "chatnode_connections_total", "WebSocket connections accepted", registry=reg
        )
        self.frames_in = Counter(
            "chatnode_frames_in_total", "WebSocket frames received", registry=reg
        )
        self.frames_out = Counter(
            "chatnode_frames_out_total", "WebSocket frames sent", registry=reg
        )
        self.messages = Counter("chatnode_messages_total", "new messages stored", registry=reg)
        self.acks = Counter(
            "chatnode_acks_total", "send acknowledgements (including resends)", registry=reg
        )
        self.deliveries = Counter(
            "chatnode_deliveries_total",
            "message and update events queued to subscribers",
            registry=reg,
        )
        self.errors = LabeledCounter("chatnode_errors_total", "error replies by code", "code", reg)
        self.http = LabeledCounter("chatnode_http_requests_total", "HTTP API requests", "path", reg)
        self.slow_disconnects = Counter(
            "chatnode_slow_consumer_disconnects_total",
            "connections closed because their send queue overflowed",
            registry=reg,
        )
        self.commit_seconds = Histogram(
            "chatnode_commit_seconds",
            "latency of durable commits (queue + fsync)",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.write_seconds = Histogram(
            "chatnode_db_write_seconds",
            "duration of one synced group write",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.write_batches = Histogram(
            "chatnode_db_write_batch_commits",
            "commits joined in one group write",
            buckets=SIZE_BUCKETS,
            registry=reg,
        )

    def add(self, reading: Reading) -> None:
        """Register a reading (raises ``ValueError`` if its name is taken)."""
        self.registry.register(_Unchecked(reading) if reading.name in _SHADOWED else reading)

    def gauge(self, name: str, help: str, read: Callable[[], float | None]) -> None:
        """A gauge read at scrape time."""
        self.add(Reading(name, help, read))

    def value(
        self, name: str, help: str, read: Callable[[], float | None], *, kind: Kind = "gauge"
    ) -> None:
        """One unlabeled value read at scrape time (``kind`` gauge or counter)."""
        self.add(Reading(name, help, read, kind=kind))

    def labeled(
        self,
        name: str,
        help: str,
        label: str,
        read: Callable[[], Mapping[str, float] | None],
        *,
        kind: Kind = "gauge",
    ) -> None:
        """Values by one label, read at scrape time (``kind`` gauge or counter)."""

        def by_tuple() -> dict[Labels, float] | None:
            values = read()
            return None if values is None else {(k,): v for k, v in values.items()}

        self.add(Reading(name, help, by_tuple, kind=kind, labels=(label,)))

    def collect(self) -> Iterator[Metric]:
        """Every metric family, without the ``*_created`` series of owned counters and
        histograms (process start times that the 0.0.4 text format would expose as extra
        gauges)."""
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The current value of one sample (None if absent); for tests and tools."""
        return self.registry.get_sample_value(name, dict(labels or {}))
