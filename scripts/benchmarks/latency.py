"""Latency as one client sees it while something else happens (a /start flood, a reload): the client of the
issue-14 figures and the nearest-rank percentile they are reported by."""

from __future__ import annotations

import math
import time

import httpx2


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100): with few samples p99 is the largest but one or two,
    never an interpolation between them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def timed_requests(url: str, headers: list[str], seconds: float, rate: float | None, expect: int,
                   body: str | None = None) -> tuple[list[float], list[str]]:
    """One keep-alive connection, one request in flight, for `seconds`: paced at `rate` per second (a
    signed-in user among a flood: a closed loop as fast as possible would be one more flood
    connection), or back to back when `rate` is None (so that any stall lands on a request).
    Returns the latencies in ms and what went wrong (answers other than `expect` [and `body`])."""
    latencies, wrong = [], []
    pairs = [tuple(h.split(": ", 1)) for h in headers]
    with httpx2.Client(timeout=30, headers=pairs) as client:  # type: ignore[arg-type]
        start = time.monotonic()
        due = start
        while (now := time.monotonic()) < start + seconds:
            if rate:  # no catching up after a slow answer: a user does not send a burst either
                time.sleep(max(0.0, due - now))
                due = max(due, now) + 1 / rate
            t0 = time.perf_counter()
            r = client.get(url)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != expect or (body is not None and r.text.strip() != body):
                wrong.append(f"{r.status_code} {r.headers.get('location', '')} {r.text[:80]!r}")
    return latencies, wrong
