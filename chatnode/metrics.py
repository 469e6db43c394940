"""Process metrics in the Prometheus text exposition format (version 0.0.4).

A handful of counters, gauges and histograms owned by the node; the event loop updates them
(single-threaded, no locks) and ``GET /metrics`` renders them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol

__all__ = ["Counter", "Gauge", "Histogram", "LabeledCounter", "LabeledReading", "Metrics"]

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric(Protocol):
    def render(self) -> Iterable[str]: ...


class Counter:
    __slots__ = ("help", "name", "value")

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        yield f"{self.name} {_num(self.value)}"


class LabeledCounter:
    __slots__ = ("help", "label", "name", "values")

    def __init__(self, name: str, help: str, label: str) -> None:
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, float] = {}

    def inc(self, key: str, n: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + n

    def get(self, key: str) -> float:
        return self.values.get(key, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key in sorted(self.values):
            yield f'{self.name}{{{self.label}="{_label(key)}"}} {_num(self.values[key])}'


class Gauge:
    """A value read when rendered."""

    __slots__ = ("help", "name", "read")

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help = help
        self.read = read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        yield f"{self.name} {_num(self.read())}"


class LabeledReading:
    """Labeled values read when rendered (counters or gauges kept by another component)."""

    __slots__ = ("help", "kind", "label", "name", "read")

    def __init__(
        self,
        name: str,
        help: str,
        label: str,
        read: Callable[[], Mapping[str, float]],
        *,
        kind: str = "gauge",
    ) -> None:
        if kind not in ("gauge", "counter"):
            raise ValueError("kind is gauge or counter")
        self.name = name
        self.help = help
        self.label = label
        self.read = read
        self.kind = kind

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        values = self.read()
        for key in sorted(values):
            yield f'{self.name}{{{self.label}="{_label(key)}"}} {_num(values[key])}'


class Histogram:
    __slots__ = ("bounds", "count", "counts", "help", "name", "sum")

    def __init__(self, name: str, help: str, bounds: Iterable[float]) -> None:
        self.name = name
        self.help = help
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {acc}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {_num(self.sum)}"
        yield f"{self.name}_count {self.count}"


class Metrics:
    """Every metric of a node."""

    def __init__(self) -> None:
        self.connections_total = Counter(
            "chatnode_connections_total", "WebSocket connections accepted"
        )
        self.frames_in = Counter("chatnode_frames_in_total", "WebSocket frames received")
        self.frames_out = Counter("chatnode_frames_out_total", "WebSocket frames sent")
        self.messages = Counter("chatnode_messages_total", "new messages stored")
        self.acks = Counter("chatnode_acks_total", "send acknowledgements (including resends)")
        self.deliveries = Counter(
            "chatnode_deliveries_total", "message and update events queued to subscribers"
        )
        self.errors = LabeledCounter("chatnode_errors_total", "error replies by code", "code")
        self.http = LabeledCounter("chatnode_http_requests_total", "HTTP API requests", "path")
        self.slow_disconnects = Counter(
            "chatnode_slow_consumer_disconnects_total",
            "connections closed because their send queue overflowed",
        )
        self.commit_seconds = Histogram(
            "chatnode_commit_seconds", "latency of durable commits (queue + fsync)", LATENCY_BUCKETS
        )
        self.write_seconds = Histogram(
            "chatnode_db_write_seconds", "duration of one synced group write", LATENCY_BUCKETS
        )
        self.write_batches = Histogram(
            "chatnode_db_write_batch_commits", "commits joined in one group write", SIZE_BUCKETS
        )
        self.gauges: list[Gauge | LabeledReading] = []

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def labeled(
        self,
        name: str,
        help: str,
        label: str,
        read: Callable[[], Mapping[str, float]],
        *,
        kind: str = "gauge",
    ) -> None:
        """Register labeled values read at render time (``kind`` gauge or counter)."""
        self.gauges.append(LabeledReading(name, help, label, read, kind=kind))

    def render(self) -> str:
        lines: list[str] = []
        metrics: tuple[_Metric, ...] = (
            self.connections_total,
            self.frames_in,
            self.frames_out,
            self.messages,
            self.acks,
            self.deliveries,
            self.errors,
            self.http,
            self.slow_disconnects,
            self.commit_seconds,
            self.write_seconds,
            self.write_batches,
            *self.gauges,
        )
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
