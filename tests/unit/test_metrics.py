"""chatnode.metrics: owned metrics and scrape-time readings on a per-node registry."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatnode.metrics import Metrics, Reading


def parsed(m: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_owned_metrics_keep_their_names_and_two_nodes_do_not_share() -> None:
    a, b = Metrics(), Metrics()
    a.acks.inc()
    a.deliveries.inc(3)
    a.errors.inc("not_found")
    a.errors.inc("not_found")
    a.commit_seconds.observe(0.003)
    values = parsed(a)
    assert values["chatnode_acks_total"] == 1 and values["chatnode_deliveries_total"] == 3
    assert values["chatnode_errors_total{code=not_found}"] == 2
    assert values["chatnode_commit_seconds_count"] == 1
    assert values["chatnode_commit_seconds_bucket{le=0.005}"] == 1
    assert not any(name.endswith("_created") for name in values)  # no start-time series
    assert parsed(b)["chatnode_acks_total"] == 0
    assert b.sample("chatnode_errors_total", {"code": "not_found"}) is None


def test_readings_are_read_at_scrape_time_and_absent_when_none() -> None:
    m = Metrics()
    state: dict[str, float] | None = None
    m.labeled("chatnode_x_total", "x", "kind", lambda: state, kind="counter")
    m.value("chatnode_y", "y", lambda: None if state is None else len(state))
    assert "chatnode_x_total" not in m.render().decode()  # the component is not running
    state = {"a": 1, "b": 2}
    values = parsed(m)
    assert values["chatnode_x_total{kind=a}"] == 1 and values["chatnode_y"] == 2
    state["a"] = 5
    assert m.sample("chatnode_x_total", {"kind": "a"}) == 5


def test_two_labels_and_the_shadowed_gauge() -> None:
    m = Metrics()
    m.add(Reading("chatnode_z_total", "z", lambda: {("dns", "ok"): 3.0},
                  kind="counter", labels=("source", "result")))  # fmt: skip
    m.gauge("chatnode_connections", "open now", lambda: 4)  # next to chatnode_connections_total
    m.connections_total.inc()
    values = parsed(m)
    assert values["chatnode_z_total{result=ok,source=dns}"] == 3
    assert values["chatnode_connections"] == 4 and values["chatnode_connections_total"] == 1


def test_a_failing_reading_is_left_out_and_names_are_checked() -> None:
    m = Metrics()

    def broken() -> float:
        raise RuntimeError("bug")

    m.value("chatnode_broken", "b", broken)
    m.value("chatnode_fine", "f", lambda: 1)
    values = parsed(m)
    assert "chatnode_broken" not in values and values["chatnode_fine"] == 1
    with pytest.raises(ValueError):
        m.value("chatnode_fine", "again", lambda: 2)  # a name is registered once
    with pytest.raises(ValueError):
        Reading("chatnode_no_suffix", "c", lambda: 1, kind="counter")
