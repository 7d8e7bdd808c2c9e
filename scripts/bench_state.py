"""The measurements of issue 14 that are about time, not throughput: latency seen by a client
while something else happens (a /start flood, a reload) and event-loop stalls (sign-out at a
million sessions). `scripts/bench.py` starts the processes and prints the tables; this module
holds the clients, the loop-lag ticker and the in-process sign-out probe, none of which needs
anything of bench.py but what it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx2

PROVIDER = "bench"  # the provider name typical_sessions gives every session
FEW = 3  # sessions per user in the sign-out probe ("one user with a few sessions")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100): with few samples p99 is the largest but one or two,
    never an interpolation between them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------- clients


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


class SilentIssuer:
    """An issuer that accepts TCP connections and never answers: discovery against it hangs until the
    outpost's own timeout. Connections are accepted (and held) by a thread, so that the bench can say
    the reload did reach it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0), backlog=64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SilentIssuer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.closed.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except TimeoutError:
                pass


# ---------------------------------------------------------------- event loop


async def max_loop_lag(seconds: float, interval: float = 0.001) -> tuple[float, float]:
    """A task sleeping `interval` again and again for `seconds`: the longest delay of a wake-up past
    its due time (whatever runs on the loop without yielding shows up there), and the most CPU time the
    loop's thread spent within one tick. The second tells a stall of ours (both large) from the process
    waiting for a core (a late wake-up with next to no CPU spent), both in ms."""
    worst = busy = 0.0
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        c0 = time.thread_time()
        await asyncio.sleep(interval)
        worst = max(worst, time.perf_counter() - t0 - interval)
        busy = max(busy, time.thread_time() - c0)
    return worst * 1000, busy * 1000


async def _storm(store: Any, subs: list[str], rate: float, seconds: float) -> tuple[int, float]:
    """`rate` sign-outs per second, one user each, none begun after `seconds` (a store that walks every
    session at each sign-out would otherwise hold the bench for minutes): how many were done, and the
    longest single delete_user in ms."""
    loop = asyncio.get_running_loop()
    t0, longest, done = loop.time(), 0.0, 0
    for i, sub in enumerate(subs):
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        if loop.time() >= t0 + seconds:
            break
        c0 = time.perf_counter()
        await store.delete_user(PROVIDER, sub)
        longest = max(longest, time.perf_counter() - c0)
        done += 1
    return done, longest * 1000


def _grouped(sessions: Iterable[tuple[str, Any]]) -> Iterator[tuple[int, str, Any]]:
    """Every FEW consecutive sessions made one user's (their sub replaced by the first's): (user, cookie, session)."""
    sub = ""
    for i, (cookie, session) in enumerate(sessions):
        if i % FEW == 0:
            sub = session.sub
        yield i // FEW, cookie, dataclasses.replace(session, sub=sub)


async def signout_probe(store: Any, sessions: Iterable[tuple[str, Any]], n: int, repeats: int = 9,
                        rate: float = 100, seconds: float = 3, idle: float = 1) -> dict[str, Any]:
    """Fill `store` with `n` sessions through put(), FEW per user; time delete_user for `repeats` users
    spread over the fill order (each checked gone through get()); then `rate` sign-outs per second
    for `seconds` next to a 1 ms ticker, after the same ticker alone for `idle` s (the loop's own noise:
    on a shared VM the process waits for a core now and then, which the ticker counts as a stall too)."""
    users = -(-n // FEW)
    timed = sorted({round(k * (users - 1) / max(1, repeats - 1)) for k in range(repeats)})
    subs: list[str] = []
    cookies: dict[int, str] = {}
    t0 = time.monotonic()
    gc.disable()  # the fill only sets the scene: ~10 % faster without collections walking what it made so far
    for user, cookie, session in _grouped(sessions):
        await store.put(cookie, session)
        if user == len(subs):
            subs.append(session.sub)
        if user in timed:
            cookies.setdefault(user, cookie)
    fill = time.monotonic() - t0
    gc.enable()
    gc.collect()  # the fill's garbage is not the sign-out's
    count = store.count()
    delete_ms = []
    for user in timed:
        if await store.get(PROVIDER, cookies[user]) is None:
            raise SystemExit(f"sign-out probe: user {user}'s session is not in the store before sign-out")
        c0 = time.perf_counter()
        await store.delete_user(PROVIDER, subs[user])
        delete_ms.append((time.perf_counter() - c0) * 1000)
        if await store.get(PROVIDER, cookies[user]) is not None:
            raise SystemExit(f"sign-out probe: delete_user left user {user}'s session in the store")
    idle_lag, idle_busy = await max_loop_lag(idle)
    rest = [u for u in range(users) if u not in cookies]
    storm_subs = [subs[u] for u in random.Random(14).sample(rest, min(len(rest), int(rate * seconds)))]
    (lag, busy), (done, longest) = await asyncio.gather(max_loop_lag(seconds),
                                                        _storm(store, storm_subs, rate, seconds))
    return {"n": n, "count": count, "users": users, "fill_seconds": fill, "delete_ms": delete_ms,
            "delete_median_ms": statistics.median(delete_ms), "idle_lag_ms": idle_lag, "idle_busy_ms": idle_busy,
            "idle_seconds": idle, "storm": done, "storm_planned": len(storm_subs),
            "storm_seconds": seconds, "storm_lag_ms": lag, "storm_busy_ms": busy,
            "storm_longest_ms": longest,
            "count_after": store.count()}
