"""Issue 14's login figures: /start's CPU per request and req/s next to a plain redirect (two rows of the
rounds, on a lean runner of their own), and a signed-in user's p99 alone and next to a /start flood."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from mitm_outpost.testing.transport import LoopbackTransport

from .latency import percentile, timed_requests
from .load import Load, Result, median
from .login import check_proxied, check_redirect, log_in
from .outpost import ACCESS_LOG_OFF, start_outpost
from .processes import wait_http
from .report import fmt, met
from .shared import HOST, OUTPOST_DOMAIN, PING_PATH, START_PATH, USER, Bench, Setup

PROBE_RATE = 50  # signed-in requests per second next to a flood: one user, not one more flood connection


def start_login_setups(bench: Bench) -> tuple[dict[str, Setup], Setup]:
    """A lean runner of its own (every /start stores a pending login, which the signed-in rows' process
    must not carry) with the two flood rows, both without cookies: /start, and a protected path without
    a session (302 to /start, neither the IdP nor the store asked). Also the signed-in probe's Setup."""
    child, argv, port = start_outpost(bench, {"bench": (1, "")}, runner="lean", name="lean_login",
                                      extra=ACCESS_LOG_OFF)
    origin = f"http://{HOST}:{port}"
    wait_http(origin + PING_PATH, child, expect=204)
    host = (f"Host: bench.{OUTPOST_DOMAIN}:{port}",)
    check_redirect(origin + START_PATH, host, "/authorize")
    check_redirect(origin + "/bench", host, START_PATH)
    cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
    probe = Setup("lean runner, signed in (probe)", origin + "/bench", argv, child.pid, (f"Cookie: {cookie}", *host))
    check_proxied(probe.url, probe.headers)
    print(f"lean runner for /start: {START_PATH} answers 302 to the IdP, /bench without a session 302 to "
          f"{START_PATH}; signed in as {USER} for the probe", flush=True)
    return {"lean_start": Setup("lean runner, /start (no cookie)", origin + START_PATH, argv, child.pid, host,
                                count_non_200=False),
            "lean_redirect": Setup("lean runner, no session: 302 to /start", origin + "/bench", argv, child.pid,
                                   host, count_non_200=False)}, probe


def probe_p99(probe: Setup, seconds: int, load: Load | None = None,
              flood: Setup | None = None) -> tuple[float, int]:
    """The signed-in probe's p99 (ms) and request count over `seconds`, alone or while wrk floods
    `flood`: wrk runs a second longer, the probe starts half a second in, so every probe request
    meets the flood."""

    def measure() -> tuple[list[float], list[str]]:
        if flood:
            time.sleep(0.5)
        return timed_requests(probe.url, list(probe.headers), seconds, PROBE_RATE, 200, f"hello {USER}")

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(measure)
        if flood and load:
            r = load.run(flood.label, flood.url, seconds + 1, list(flood.headers), 0, None)
            errors = [e for e in r.errors.split(", ") if e and not e.endswith(" 3xx")]  # h2load counts the 302s
            if errors:
                sys.exit(f"{flood.label} next to the probe: {r.errors}")
        latencies, wrong = running.result()
    if wrong:
        sys.exit(f"{probe.label}: {len(wrong)} of {len(latencies)} answers not 200 'hello {USER}', e.g. {wrong[0]}")
    return percentile(latencies, 99), len(latencies)


def login_flood(args: argparse.Namespace, load: Load, rounds: dict[str, list[Result]], setups: dict[str, Setup],
                probe: Setup) -> list[str]:
    """The /start figures: CPU per request and req/s against the plain redirect from the rounds; the
    probe's p99 alone and next to a /start flood (and next to a plain-redirect flood, which queues
    the probe as much but does no login work), `--rounds` times, measured here."""
    start, plain = median(rounds["lean_start"]), median(rounds["lean_redirect"])
    cpu_ms = [1000 * r.cpu / r.rps for r in rounds["lean_start"] if r.cpu]
    ratios = [s.rps / p.rps for s, p in zip(rounds["lean_start"], rounds["lean_redirect"])]
    p99: dict[str, list[tuple[float, int]]] = {"alone": [], "lean_start": [], "lean_redirect": []}
    for n in range(args.rounds):
        for key in p99:
            print(f"round {n + 1}/{args.rounds}, signed-in probe at {PROBE_RATE}/s "
                  f"{'alone' if key == 'alone' else 'next to ' + setups[key].label}: {args.duration} s", flush=True)
            p99[key].append(probe_p99(probe, args.duration, load, setups.get(key)))
    alone = statistics.median(p for p, _ in p99["alone"])
    lines = ["\n## /start under load, lean runner (issue 14)\n",
             "| measured | figure | per round | target |", "|---|---|---|---|"]
    start_ms = 1000 * start.cpu / start.rps if start.cpu else None
    lines.append(f"| {START_PATH}: CPU per request | {fmt(start_ms, '.2f', ' ms')} ({start.rps:,.0f} req/s at "
                 f"{fmt(start.cpu, '.2f')} CPU s/s) | {', '.join(f'{c:.2f}' for c in cpu_ms)} "
                 f"| <= 1 ms {met(start_ms is not None and start_ms <= 1)} |")
    flood_ratio = start.rps / plain.rps
    lines.append(f"| /start flood / plain-redirect flood, req/s (wrk -c{args.connections}, no cookie) "
                 f"| {flood_ratio:.2f} ({start.rps:,.0f} vs {plain.rps:,.0f} req/s) "
                 f"| {', '.join(f'{r:.2f}' for r in ratios)} | >= 0.5 {met(flood_ratio >= 0.5)} |")
    for key, label, target in (("lean_start", "a /start flood", 3.0),
                               ("lean_redirect", "a plain-redirect flood", None)):
        during = statistics.median(p for p, _ in p99[key])
        per = ", ".join(f"{d / a:.2f}" for (d, _), (a, _) in zip(p99[key], p99["alone"]))
        counts = f"{sum(c for _, c in p99[key]):,} and {sum(c for _, c in p99['alone']):,} requests"
        mark = f"<= {target:.0f} {met(during / alone <= target)}" if target else "– (queueing alone, for comparison)"
        lines.append(f"| signed-in p99 during {label} / without | {during / alone:.2f} "
                     f"({during:.2f} vs {alone:.2f} ms, {counts}) | {per} | {mark} |")
    lines.append(f"\nThe probe: one keep-alive connection sending `GET /bench` with a session cookie at {PROBE_RATE} "
                 f"req/s (one in flight), in this process, {args.duration} s alone and {args.duration} s inside a "
                 f"{args.duration + 1} s wrk flood; p99 by nearest rank, median of rounds. The flood rows' CPU is "
                 f"the runner's (utime + stime) over the requests wrk counted, as in the table above.")
    return lines
