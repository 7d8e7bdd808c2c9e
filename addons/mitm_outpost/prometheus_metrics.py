"""The outpost's Prometheus metrics, defined once per process (a script reload keeps them).

Names follow authentik's outpost where it has one. Label values come from configuration or
short fixed lists, never from client input: authentik labels by client-sent host, which
makes cardinality unbounded.

In the workers of `--workers N`, prometheus-client's multiprocess mode keeps every value in a
file of the supervisor's directory (PROMETHEUS_MULTIPROC_DIR), and the supervisor serves them
all, counters and histograms summed; each gauge says how its workers' values combine
(`multiprocess_mode`, ignored in a single process).

The metrics every request touches are added up in a `Tally` first: a dict update per request,
where prometheus-client takes a lock per value, and in a worker writes each value to its
memory-mapped file (about 10 µs of a forward-auth check's CPU). The tally reaches the metrics
before every collection (a scrape; it is the registry's first collector) and, in a worker,
every REFRESH seconds (metrics.py).
"""

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric


class Tally:
    """Counts and observations since the last `flush`, per labelled child of a Counter or Histogram."""

    def __init__(self) -> None:
        self.counts: dict[Any, float] = {}
        self.observed: dict[Any, tuple[list[float], list[int]]] = {}  # child -> ([sum], count per bucket)

    def inc(self, child: Any) -> None:
        self.counts[child] = self.counts.get(child, 0) + 1

    def observe(self, child: Any, amount: float) -> None:
        """As Histogram.observe: the sum, and the first bucket whose upper bound is at least `amount`."""
        entry = self.observed.get(child)
        if entry is None:
            entry = self.observed[child] = ([0.0], [0] * len(child._upper_bounds))
        entry[0][0] += amount
        entry[1][bisect_left(child._upper_bounds, amount)] += 1

    def flush(self) -> None:
        counts, observed, self.counts, self.observed = self.counts, self.observed, {}, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, (total, buckets) in observed.items():
            child._sum.inc(total[0])
            for i, count in enumerate(buckets):
                if count:
                    child._buckets[i].inc(count)

    def collect(self) -> Iterator[Metric]:
        self.flush()
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


PROMETHEUS = CollectorRegistry()
TALLY = Tally()
PROMETHEUS.register(TALLY)  # first: every collection flushes it before the metrics below are read
OUTPOST_LABELS = ("outpost_name", "outpost_type", "uuid", "version", "build")

INFO = Gauge("authentik_outpost_info", "Outpost info", OUTPOST_LABELS, multiprocess_mode="livemax", registry=PROMETHEUS)
LAST_UPDATE = Gauge("authentik_outpost_last_update", "Time of the last provider update", OUTPOST_LABELS,
                    multiprocess_mode="livemax", registry=PROMETHEUS)
REQUESTS = Histogram("authentik_outpost_proxy_request_duration_seconds", "Requests handled by the outpost",
                     ("outpost_name", "method", "host", "type"), registry=PROMETHEUS)
UPSTREAM = Histogram("authentik_outpost_proxy_upstream_response_duration_seconds", "Upstream response time",
                     ("outpost_name", "method", "scheme", "host", "upstream_host"), registry=PROMETHEUS)
DECISIONS = Counter("mitm_outpost_decisions_total", "Decisions by provider and outcome", ("provider", "outcome"),
                    registry=PROMETHEUS)
LOGINS = Counter("mitm_outpost_logins_total", "Completed browser logins", ("provider",), registry=PROMETHEUS)
CALLBACK_FAILURES = Counter("mitm_outpost_callback_failures_total", "Failed login callbacks", ("provider", "reason"),
                            registry=PROMETHEUS)
EDGE_REFUSALS = Counter("mitm_outpost_edge_refusals_total", "Requests refused at the HTTP edge, before any decision",
                        ("code",), registry=PROMETHEUS)
ROUTES = Counter("mitm_outpost_routes_total", "Requests by the way they went in embedded mode (outpost or backend)",
                 ("route",), registry=PROMETHEUS)
SESSIONS = Gauge("mitm_outpost_sessions", "Sessions this replica holds (in memory or its local cache)",
                 multiprocess_mode="livesum", registry=PROMETHEUS)
IDP_LATENCY = Histogram("mitm_outpost_idp_request_duration_seconds", "Calls to the identity provider", ("call",),
                        registry=PROMETHEUS)
# Workers only: what the supervisor's /ping reads (one sample per live worker, by pid). Not in any
# registry, so a single process's /metrics does not show it.
WORKER_READY = Gauge("mitm_outpost_worker_ready", "Whether this worker is ready (providers loaded, store up)",
                     multiprocess_mode="liveall", registry=None)
