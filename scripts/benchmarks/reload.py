"""Issue 14's reload figure: /ping latency of a lean runner reloading (SIGHUP) a configuration whose new
provider's issuer accepts TCP connections and never answers."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import sys
import threading

from .latency import percentile, timed_requests
from .outpost import ACCESS_LOG_OFF, provider_yaml, start_outpost
from .processes import wait_http
from .report import met
from .shared import HOST, PING_PATH, Bench

RELOAD_WINDOW = 3  # seconds of /ping after SIGHUP (and 1 s before it, --quick 0.5 s)

Round = tuple[list[float], list[float], int]  # /ping latencies before and after SIGHUP, connections held by then


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


def reload_rounds(args: argparse.Namespace, bench: Bench, lead: float) -> tuple[list[Round], str]:
    """A lean runner with one provider gains a second whose issuer accepts TCP and never answers; SIGHUP;
    /ping from one client back to back for RELOAD_WINDOW s (and `lead` s before SIGHUP, for comparison),
    `--rounds` times (each SIGHUP starts the reload anew: the one before is still waiting on that issuer).
    The rounds and the runner's log."""
    with SilentIssuer(HOST) as silent:
        child, _, port = start_outpost(bench, {"bench": (1, "")}, runner="lean", name="lean_reload",
                                       extra=ACCESS_LOG_OFF)
        ping = f"http://{HOST}:{port}{PING_PATH}"
        wait_http(ping, child, expect=204)
        config = bench.tmp / "lean_reload.yaml"
        silent_provider = provider_yaml(bench, "silent", port, issuer=f"http://{HOST}:{silent.port}")
        config.write_text(config.read_text() + silent_provider)
        runs = []
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds}, reload: /ping {lead:g} s, SIGHUP, /ping {RELOAD_WINDOW} s",
                  flush=True)
            before, wrong = timed_requests(ping, [], lead, None, 204)
            os.kill(child.pid, signal.SIGHUP)
            during, wrong_during = timed_requests(ping, [], RELOAD_WINDOW, None, 204)
            if wrong or wrong_during:
                sys.exit(f"/ping during the reload answered {(wrong + wrong_during)[0]}")
            runs.append((before, during, len(silent.held)))
        log = child.log.read_text(errors="replace")
    bench.procs.stop(child)  # once the issuer has closed its connections: the runner's exit waits for the reload
    return runs, log


def reload_lines(args: argparse.Namespace, bench: Bench) -> list[str]:
    """The reload's table: /ping before and after SIGHUP, p99 per round, and whether the reload reached the
    silent issuer."""
    lead = 0.5 if args.quick else 1.0  # /ping before SIGHUP
    runs, log = reload_rounds(args, bench, lead)
    p99 = [percentile(d, 99) for _, d, _ in runs]
    worst = max(max(d) for _, d, _ in runs)
    before = [x for b, _, _ in runs for x in b]
    during = [x for _, d, _ in runs for x in d]
    median_p99 = statistics.median(p99)
    return ["\n## /ping during a reload, lean runner (issue 14)\n",
            "| /ping, one client back to back | requests | p50 | p99 | max | per round (p99) | target |",
            "|---|---:|---:|---:|---:|---|---|",
            f"| {lead:g} s before SIGHUP | {len(before):,} | {statistics.median(before):.2f} ms | "
            f"{percentile(before, 99):.2f} ms | {max(before):.2f} ms | | – |",
            f"| {RELOAD_WINDOW} s after SIGHUP (a second provider, its issuer never answers) | {len(during):,} "
            f"| {statistics.median(during):.2f} ms | {median_p99:.2f} ms | {worst:.2f} ms "
            f"| {', '.join(f'{p:.2f}' for p in p99)} | p99 <= 50 ms {met(median_p99 <= 50)} |",
            "",
            f"The silent issuer took {runs[-1][2]} connection(s) during the windows (connections after each round: "
            f"{', '.join(str(c) for _, _, c in runs)}) and answered none; SIGHUP logged "
            f"{log.count('SIGHUP: reloading')} time(s). p99 after SIGHUP: median of rounds; max: over all rounds."]
