"""Two lean runners sharing Redis behind one nginx (`upstream { server a; server b; keepalive }`), against one
of them alone behind the same nginx, with the Redis commands a request costs once the cache is warm."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from mitm_outpost.testing.processes import free_port
from mitm_outpost.testing.transport import LoopbackTransport

from .load import Load, Result
from .login import check_proxied, log_in
from .nginx import start_nginx
from .outpost import ACCESS_LOG_OFF, OUTPOST_CONFIG, outpost_argv, provider_yaml, session_store, start_runner
from .processes import cpu_seconds, wait_http
from .redis_server import command_calls
from .report import fmt
from .shared import HOST, KEEPALIVE, OUTPOST_DOMAIN, PING_PATH, Bench
from .skip_rules import skip_rules_yaml

REPLICA_SERVERS = """\
    upstream bench_pair {{ server {host}:{a}; server {host}:{b}; keepalive {keepalive}; }}
    upstream bench_one {{ server {host}:{a}; keepalive {keepalive}; }}
    server {{
        listen {host}:{pair_front};
        location / {{ proxy_pass http://bench_pair; proxy_http_version 1.1; proxy_set_header Connection "";
                      proxy_set_header Host $http_host; }}
    }}
    server {{
        listen {host}:{one_front};
        location / {{ proxy_pass http://bench_one; proxy_http_version 1.1; proxy_set_header Connection "";
                      proxy_set_header Host $http_host; }}
    }}"""

LABELS = {"one": "1 lean runner (Redis) behind nginx", "pair": "2 lean runners (shared Redis) behind nginx"}
# PING (health check, 1/s per replica) and SUBSCRIBE are the replicas' background; INFO, HELLO and CLIENT
# are this bench's own connection asking for the stats.
BACKGROUND = ("ping", "subscribe", "info", "hello", "client|setinfo", "client")

Run = tuple[Result, dict[str, int], dict[str, int], float]  # a round: result, hot and background commands, seconds


def start_replicas(bench: Bench, nginx: str, redis_port: int) -> tuple[dict[str, int], list[int], list[str]]:
    """Replicas a and b, the same configuration on both: provider `pair` is reached through nginx's pair_front
    (both replicas), provider `one` through one_front (replica a only). The fronts' ports, the replicas' pids
    and nginx's command."""
    a, b, pair_front, one_front = (free_port() for _ in range(4))
    text = OUTPOST_CONFIG.format(store=session_store(redis_port), providers="".join(
        provider_yaml(bench, p, front, skip_rules_yaml(1)) for p, front in (("pair", pair_front), ("one", one_front))))
    pids = []
    for name, port in (("replica-a", a), ("replica-b", b)):
        child, _ = start_runner(bench, name, "lean", text, port, ACCESS_LOG_OFF)
        wait_http(f"http://{HOST}:{port}{PING_PATH}", child, expect=204)
        pids.append(child.pid)
    child, nginx_argv = start_nginx(bench, "nginx-replicas", nginx, REPLICA_SERVERS.format(
        host=HOST, a=a, b=b, pair_front=pair_front, one_front=one_front, keepalive=KEEPALIVE))
    wait_http(f"http://{HOST}:{pair_front}{PING_PATH}", child, expect=204)
    return {"one": one_front, "pair": pair_front}, pids, nginx_argv


def measure_rounds(args: argparse.Namespace, load: Load, bench: Bench, key: str, front: int, pids: list[int],
                   redis_port: int) -> list[Run]:
    """Signed in through `front`, `--rounds` measurements, each with the replicas' CPU and the Redis commands
    counted meanwhile."""
    label = LABELS[key]
    host = f"Host: {key}.{OUTPOST_DOMAIN}:{front}"
    cookie = log_in(f"http://{key}.{OUTPOST_DOMAIN}:{front}", LoopbackTransport())
    headers = [f"Cookie: {cookie}", host]
    for _ in range(4):  # both replicas answer (and cache the session)
        check_proxied(f"http://{HOST}:{front}/bench", headers)
    url = f"http://{HOST}:{front}/bench"
    runs = []
    for n in range(args.rounds):
        if args.warmup:
            load.run(label, url, args.warmup, headers, 0, None)
        calls0, t0 = command_calls(redis_port), time.monotonic()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        r = load.run(label, url, args.duration, headers, 0, None, bench.tmp / "non200.lua")
        seconds = time.monotonic() - t0
        r.cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / seconds
        calls1 = command_calls(redis_port)
        diff = {k: calls1.get(k, 0) - calls0.get(k, 0) for k in calls1}
        background = {k: v for k, v in diff.items() if k in BACKGROUND and v}
        hot = {k: v for k, v in diff.items() if k not in BACKGROUND and v}
        runs.append((r, hot, background, seconds))
        print(f"  {label}, round {n + 1}: {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}, "
              f"Redis commands besides PING/SUBSCRIBE/INFO: {hot or 'none'}{', ' + r.errors if r.errors else ''}",
              flush=True)
        if "not 200" in r.errors:
            sys.exit(f"{label}: {r.errors}: the session stopped working")
    return runs


def replicas(args: argparse.Namespace, load: Load, bench: Bench, nginx: str, redis_port: int) -> list[str]:
    """The replicas' table: req/s, p99, CPU and Redis commands per request of the median round of each."""
    fronts, pids, nginx_argv = start_replicas(bench, nginx, redis_port)
    results = {key: measure_rounds(args, load, bench, key, front, pids, redis_port) for key, front in fronts.items()}
    lines = ["| setup | req/s | p99 | CPU of the replicas (s/s) | Redis commands / request (besides PING, SUBSCRIBE "
             "and the bench's INFO) | background and bench commands during the run |",
             "|---|---:|---:|---:|---|---|"]
    med = {}
    for key, label in LABELS.items():
        r, hot, background, seconds = sorted(results[key], key=lambda x: x[0].rps)[(len(results[key]) - 1) // 2]
        med[key] = r
        total = sum(hot.values())
        per = f"{total / r.requests:.5f} ({total} in {r.requests:,} requests: " + \
              (", ".join(f"{k} {v}" for k, v in sorted(hot.items())) or "none") + ")" if r.requests else "–"
        bg = ", ".join(f"{k} {v}" for k, v in sorted(background.items())) or "none"
        lines.append(f"| {label} | {r.rps:,.0f} | {fmt(r.p99_ms, '.2f', ' ms')} | {fmt(r.cpu, '.2f')} | {per} "
                     f"| {bg} in {seconds:.1f} s |")
    per_round = ", ".join(f"{p[0].rps / o[0].rps:.2f}" for p, o in zip(results["pair"], results["one"]))
    replica_argv = outpost_argv("lean", bench.confdir, Path("<replica>.yaml"), 0, ACCESS_LOG_OFF)
    lines.append("")
    lines.append(f"2 replicas / 1 replica: {med['pair'].rps / med['one'].rps:.2f} (per round {per_round}); nproc "
                 f"{len(os.sched_getaffinity(0))}, shared by nginx, wrk, Redis and the replicas (reported, not tuned).")
    lines.append(f"nginx: `{shlex.join(nginx_argv)}` with `upstream {{ server a; server b; keepalive {KEEPALIVE}; }}`; "
                 f"replicas: `PYTHONPATH=addons {shlex.join(replica_argv)}` "
                 f"(ports per replica), `outpost: {{session_store: redis://{HOST}:<port>/0}}`.")
    return lines
