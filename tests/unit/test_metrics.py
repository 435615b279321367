"""The hot metrics read exactly as prometheus_client's own would for the same calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from keyguard_server._metrics import HotCollector, HotCounter, HotHistogram

BUCKETS = (0.0002, 0.0005, 0.001, 2.5)
# Below, on and above each bound (a bound itself belongs to its own bucket: le), and past the last.
SECONDS = (0.0, 0.0001, 0.0002, 0.00021, 0.0005, 0.0009, 0.001, 1.0, 2.5, 3.0, 0.0002)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The scrape, without the _created series (creation times differ between the two)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_hot_metrics_expose_what_prometheus_client_would() -> None:
    theirs = CollectorRegistry()
    decisions = Counter("t_decisions_total", "Decisions.", ["decision"], registry=theirs)
    hits = Counter("t_hits_total", "Hits.", registry=theirs)
    latency = Histogram("t_seconds", "Latency.", ["method"], buckets=BUCKETS, registry=theirs)

    ours = CollectorRegistry()
    collector = HotCollector()
    hot_decisions = HotCounter("t_decisions_total", "Decisions.", ["decision"], collector=collector)
    hot_hits = HotCounter("t_hits_total", "Hits.", collector=collector)
    hot_latency = HotHistogram("t_seconds", "Latency.", ["method"], BUCKETS, collector=collector)
    ours.register(collector)

    for counter in (decisions, hot_decisions):
        counter.labels("ALLOW").inc()
        counter.labels("ALLOW").inc()
        counter.labels("BAD_SECRET")  # a child never incremented is still exposed, at 0
    for counter in (hits, hot_hits):
        counter.inc()
    for histogram in (latency, hot_latency):
        for seconds in SECONDS:
            histogram.labels("/a/B").observe(seconds)
        histogram.labels("/a/C").observe(0.0004)

    assert exposition(ours) == exposition(theirs)
