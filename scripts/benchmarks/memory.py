"""Memory per session (a MemoryStore filled in a fresh process: RSS and tracemalloc; RedisStore.put into the
private redis-server: INFO memory), the typical session they are filled with, and the soak: the lean runner's
RSS every 10 s under a fixed request rate."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import tracemalloc
import urllib.parse
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from mitm_outpost import identity, sessions
from mitm_outpost.redis_store import RedisStore, encode

from . import ROOT
from .load import parse_h2load, shown
from .processes import MIB, rss_bytes
from .redis_server import redis_client, start_redis
from .shared import BENCH_COMMAND, HOST, Bench, Setup

BYTES_PER_SESSION = 2048  # the target, in a MemoryStore and in Redis


def typical_sessions(n: int) -> Iterator[tuple[str, Any]]:
    """`n` sessions as identity.build_session makes them at login for a typical user: authentik-like
    claims (64-hex sub, username, email, name, 2 groups, sid), legacy headers on (the default), and a
    distinct ~900-byte JWT per session used as X-authentik-jwt and kept as the id_token (the same string,
    as when the access token is not a JWT). Yields (cookie value, Session)."""
    provider = SimpleNamespace(name="bench", basic_auth=None, session_lifetime=86400)
    for i in range(n):
        sub = secrets.token_hex(32)
        claims = {"sub": sub, "preferred_username": f"user{i:06d}", "email": f"user{i:06d}@example.com",
                  "name": f"User Number {i}", "groups": ["staff", "engineering"], "sid": secrets.token_hex(16),
                  "iss": "https://auth.example.com/application/o/bench/", "aud": "bench-client", "exp": 0}
        jwt = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImJlbmNoIiwidHlwIjoiSldUIn0." + secrets.token_urlsafe(480) + "."
               + secrets.token_urlsafe(150))
        yield sessions.new_id(), identity.build_session(provider, claims, jwt, jwt, True)  # type: ignore[arg-type]


def fresh_process_json(flag: str, value: str, what: str) -> dict:
    """Run this package with a hidden probe flag in a fresh process (nothing of the bench's own heap or
    threads in its numbers) and return the JSON of its last line."""
    done = subprocess.run([*BENCH_COMMAND, flag, value], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_probe(mode: str, n: int) -> None:
    """Run in a fresh process (`--memory-probe rss|tracemalloc:N`): put `n` typical sessions in a
    MemoryStore and print the growth as JSON. `rss`: VmRSS before/after (includes allocator slack and
    the interpreter's pools); `tracemalloc`: bytes Python allocated and still holds."""
    store = sessions.MemoryStore()
    made = list(typical_sessions(1))  # imports and first-use caches before the baseline
    asyncio.run(store.put(*made[0]))
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if mode == "tracemalloc" else rss_bytes(os.getpid())

    async def fill() -> None:
        for cookie, session in typical_sessions(n):
            await store.put(cookie, session)

    asyncio.run(fill())
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if mode == "tracemalloc" else rss_bytes(os.getpid())
    sample = next(iter(store._sessions.values()))  # noqa: SLF001
    header_bytes = sum(len(a) + len(b) for a, b in sample.headers)
    print(json.dumps({"mode": mode, "n": n, "before": before, "after": after, "count": store.count(),
                      "header_bytes": header_bytes, "headers": len(sample.headers),
                      "jwt_bytes": len(sample.id_token_hint)}))


def redis_memory(port: int, n: int) -> dict[str, float]:
    """used_memory before/after RedisStore.put of `n` typical sessions (each: the session key, its
    user index and its IdP-session index, all with an expiry), on db 1, then flushed."""
    client = redis_client(port)
    client.flushall()
    before = client.info("memory")["used_memory"]
    sample_len, took = 0, 0.0

    async def fill() -> None:
        nonlocal sample_len, took
        store = RedisStore(f"redis://{HOST}:{port}/1")
        queue = list(typical_sessions(n))
        sample_len = len(encode(queue[0][1]))
        t0 = time.monotonic()
        for i in range(0, n, 32):  # 32 puts in flight (the client's pool has a connection limit)
            await asyncio.gather(*(store.put(c, s) for c, s in queue[i:i + 32]))
        await store.client.aclose()
        took = time.monotonic() - t0

    asyncio.run(fill())
    after = client.info("memory")["used_memory"]
    keys = redis_client(port, db=1).dbsize()
    client.flushall()
    return {"before": before, "after": after, "keys": keys, "value_bytes": sample_len, "seconds": took}


def print_memory(args: argparse.Namespace, bench: Bench) -> int | None:
    """The memory-per-session table (a fresh process per mode; --quick: RSS only), then Redis's row in a
    private redis-server, which the replicas then share: its port, None without redis-server."""
    print(f"\n## Memory per session ({args.sessions:,} sessions)\n", flush=True)
    modes = ("rss",) if args.quick else ("rss", "tracemalloc")
    mem = {mode: fresh_process_json("--memory-probe", f"{mode}:{args.sessions}", f"memory probe {mode}")
           for mode in modes}
    rss = mem["rss"]
    print("| store | measured | before | after | per session | target |")
    print("|---|---|---:|---:|---:|---|")
    for m, how in ((rss, "VmRSS of a fresh Python process"),
                   (mem.get("tracemalloc"), "tracemalloc (Python allocations still held)")):
        if m is None:
            continue
        per = (m["after"] - m["before"]) / m["n"]
        print(f"| MemoryStore, in-process | {how} | {m['before'] / MIB:.1f} MiB | {m['after'] / MIB:.1f} MiB "
              f"| {per:,.0f} B | <= {BYTES_PER_SESSION} B {'✓' if per <= BYTES_PER_SESSION else '✗ missed'} |")
    redis_info = start_redis(bench)
    if not redis_info:
        print("\nredis-server not installed: no Redis figures (apt-get install redis-server)", flush=True)
        return None
    redis_port, redis_version = redis_info
    rm = redis_memory(redis_port, args.sessions)
    per = (rm["after"] - rm["before"]) / args.sessions
    print(f"| RedisStore ({redis_version}) | INFO memory used_memory, {rm['keys']:,} keys "
          f"(session + user index + sid index each) | {rm['before'] / MIB:.1f} MiB | {rm['after'] / MIB:.1f} MiB "
          f"| {per:,.0f} B | <= {BYTES_PER_SESSION} B {'✓' if per <= BYTES_PER_SESSION else '✗ missed'} |")
    print(f"\nA typical session: {rss.get('headers', '?')} identity headers (legacy ones included), "
          f"{rss['header_bytes']} bytes of names and values in wire form, the X-authentik-jwt value being a "
          f"{rss['jwt_bytes']}-byte JWT that is also the id_token (kept once, as the header value); "
          f"Redis value {rm['value_bytes']} bytes of JSON; {args.sessions:,} RedisStore.put (32 in flight) took "
          f"{rm['seconds']:.1f} s.", flush=True)
    return redis_port


def soak(args: argparse.Namespace, bench: Bench, setup: Setup, capacity: float) -> list[str]:
    """~80 % of the lean runner's signed-in capacity for `--soak` minutes with h2load --rps (a fixed
    rate; Debian's wrk has no -R), sampling the runner's VmRSS every 10 s."""
    h2load = shutil.which("h2load")
    if not h2load:
        return ["soak: needs h2load (apt-get install nghttp2-client) for a fixed request rate; skipped"]
    seconds = int(args.soak * 60)
    clients = args.connections
    rate = max(1, int(capacity * 0.8 / clients))
    # h2load sends its own Host (from the URL): a -H Host would be a second one (400), so the URL names
    # the provider's host and --connect-to the outpost.
    host = next(h.split(": ", 1)[1] for h in setup.headers if h.startswith("Host: "))
    parts = urllib.parse.urlsplit(setup.url)
    h = [arg for header in setup.headers if not header.startswith("Host: ") for arg in ("-H", header)]
    argv = [h2load, "--h1", "-c", str(clients), "-t", "1", "--rps", str(rate), "-D", str(seconds),
            f"--connect-to={parts.netloc}", *h, f"http://{host}{parts.path}"]
    print(f"soak: {args.soak:g} min at {rate * clients:,} req/s (~80 % of {capacity:,.0f}) on {setup.label}",
          flush=True)
    samples = [(0, rss_bytes(setup.pid))]  # type: ignore[arg-type]
    t0 = time.monotonic()
    child = bench.procs.start("soak", argv)
    while child.proc.poll() is None:
        time.sleep(min(10, max(0.1, 10 - (time.monotonic() - t0) % 10)))
        if child.proc.poll() is None:
            samples.append((round(time.monotonic() - t0), rss_bytes(setup.pid)))  # type: ignore[arg-type]
            print(f"  {samples[-1][0]:>5} s  RSS {samples[-1][1] / MIB:.1f} MiB", flush=True)
    out = child.log.read_text(errors="replace")
    done = parse_h2load(out) if "req/s" in out else None
    samples.append((round(time.monotonic() - t0), rss_bytes(setup.pid)))  # type: ignore[arg-type]
    rss = [r for _, r in samples]
    return [
        f"Soak, {args.soak:g} min: `{shown(argv, setup.headers)}`",
        f"achieved {done.rps:,.0f} req/s, {done.requests or 0:,} requests, {done.errors or 'no errors'}"
        if done else "h2load output not parsed",
        "RSS series (s: MiB): " + ", ".join(f"{t}: {r / MIB:.1f}" for t, r in samples),
        f"RSS first {rss[0] / MIB:.1f} MiB, last {rss[-1] / MIB:.1f} MiB, max {max(rss) / MIB:.1f} MiB "
        f"(last - first: {(rss[-1] - rss[0]) / MIB:+.1f} MiB)",
    ]
