"""One run, step by step: start every server and sign in, measure the setups in interleaved rounds, print the
table and what follows it (the /start figures, the skip rules alone, RSS, the profile), then the soak and,
unless --no-extras, memory, sign-out, reload and replicas."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mitmproxy.version

from mitm_outpost.testing.forward_auth import find_nginx
from mitm_outpost.testing.idp import DevIdP
from mitm_outpost.testing.processes import free_port

from . import ROOT
from .apache import describe_apache, find_apache, start_apache_setups
from .load import NON_200_SCRIPT, Load, Result, combine, median
from .login import check_proxied
from .login_flood import login_flood, start_login_setups
from .memory import print_memory, soak
from .nginx import FORWARD_TEMPLATE
from .outpost import addons_mtime
from .processes import MIB, Processes, rss_bytes
from .profiling import print_profile, profile
from .reload import reload_lines
from .replicas import replicas
from .report import fmt, report
from .setups import start_ceilings, start_forward_auth, start_lean_setups, start_outpost_setups, start_worker_setups
from .shared import KEEPALIVE, OUTPOST_DOMAIN, START_PATH, Bench, Setup
from .signout import signout_lines
from .skip_rules import SKIP_PATH, SKIP_RULES, skip_rule_cost

SIGNED_IN = ("outpost", "outpost_skip", "outpost_header", "fwd_outpost", "lean", "lean_log", "fwd_lean", "apache",
             "fwd_apache")  # checked again after the rounds: no number came from login redirects


@dataclass
class Started:
    """What start_setups brought up: the rows to measure, the signed-in probe of the /start figures, and what the
    run's description names (the upstream's kind, Apache's binary and module directory)."""
    setups: dict[str, Setup]
    probe: Setup
    upstream_kind: str
    apache: tuple[str, Path] | None


def start_setups(args: argparse.Namespace, bench: Bench) -> Started:
    """Every server, each setup signed in and checked; then only --only's (and the ceilings and the outpost)."""
    upstream_kind, setups = start_ceilings(bench)
    setups.update(start_outpost_setups(bench))
    setups.update(start_lean_setups(bench))
    login_setups, probe = start_login_setups(bench)
    setups.update(login_setups)
    nginx = find_nginx()
    if nginx:
        setups.update(start_forward_auth(bench, nginx))
    else:
        print("nginx not installed: no forward-auth measurement", flush=True)
    setups.update(start_worker_setups(bench, nginx))
    apache = find_apache()
    if apache:
        setups.update(start_apache_setups(bench, *apache, nginx))
    else:
        print("Apache httpd with mod_auth_openidc not installed: no Apache rows "
              "(apt-get install apache2 libapache2-mod-auth-openidc)", flush=True)
    if args.only:
        setups = {key: s for key, s in setups.items() if key in ("direct", "bare", "outpost", *args.only.split(","))}
    return Started(setups, probe, upstream_kind, apache)


def measure_slice(args: argparse.Namespace, load: Load, bench: Bench, s: Setup, warmup: int, slice_seconds: int,
                  profiled: bool, mtime: float) -> Result:
    """One setup for one slice (after `warmup` s of discarded load), under py-spy when `profiled`; the bench
    ends if a signed-in setup's answers stopped being 200."""
    spy = profile(args, bench.procs, s.pid, warmup + slice_seconds) if profiled else None  # type: ignore[arg-type]
    r = load.run(s.label, s.url, slice_seconds, list(s.headers), warmup, s.pid,
                 bench.tmp / "non200.lua" if s.count_non_200 else None)
    r.server = shlex.join(s.server) if not s.via else f"{shlex.join(s.via)}` asking `{shlex.join(s.server)}"
    print(f"  {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}{', ' + r.errors if r.errors else ''}", flush=True)
    if s.signed_in and "not 200" in r.errors:
        changed = " addons/ changed during the run (mitmdump reloads addons/outpost.py when it changes, " \
                  "which drops the sessions)." if addons_mtime() != mtime else ""
        sys.exit(f"{s.label}: {r.errors}: the session (or bearer token) stopped working, so this measured "
                 f"something else (login redirects, 401s?).{changed}")
    if spy:
        spy.proc.wait(30)
        print(f"  profile of {s.label} under load: {args.profile}", flush=True)
    return r


def measure(args: argparse.Namespace, load: Load, bench: Bench, setups: dict[str, Setup],
            mtime: float) -> dict[str, list[Result]]:
    """`--rounds` rounds; each visits every setup `--slices` times for duration/slices seconds, so that a
    neighbour's burst of CPU hits all setups alike instead of one whole measurement. A round's figure adds up
    its slices."""
    (bench.tmp / "non200.lua").write_text(NON_200_SCRIPT)
    rounds: dict[str, list[Result]] = {key: [] for key in setups}
    slice_seconds = args.duration // args.slices
    for n in range(args.rounds):
        parts: dict[str, list[Result]] = {key: [] for key in setups}
        for k in range(args.slices):
            for key, s in setups.items():
                warmup = args.warmup if k == 0 else 0
                print(f"round {n + 1}/{args.rounds}, slice {k + 1}/{args.slices}, {s.label}: {s.url} "
                      f"({warmup} s warm-up + {slice_seconds} s)", flush=True)
                profiled = bool(args.profile) and key == args.profile_setup and n == 0 and k == 0
                parts[key].append(measure_slice(args, load, bench, s, warmup, slice_seconds, profiled, mtime))
        for key, results in parts.items():
            rounds[key].append(combine(results, slice_seconds))
    return rounds


def check_still_signed_in(setups: dict[str, Setup], mtime: float) -> None:
    """The signed-in setups still reach the upstream as alice, and whether addons/ changed meanwhile."""
    for key in SIGNED_IN:
        if key in setups:
            check_proxied(setups[key].url, setups[key].headers)
    if addons_mtime() != mtime:
        print("\nWARNING: addons/ changed during the run; mitmdump may have reloaded addons/outpost.py, "
              "so the rounds may mix code versions.", flush=True)


def describe(args: argparse.Namespace, load: Load, loadavg: str, started: Started) -> dict[str, str]:
    """The list above the table: the machine, the tools and how each kind of setup is configured."""
    setups = started.setups
    rounds_shown = "median shown" if args.rounds != 2 else "the slower of the 2 rounds shown (--quick: 2 rounds)"
    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "load average before the run": loadavg,
        "upstream": started.upstream_kind,
        "load tool": f"{load.version()}, {args.threads} thread(s), {args.connections} connections, "
                     f"{args.warmup} s warm-up + {args.duration} s per measurement in {args.slices} interleaved "
                     f"slice(s), {args.rounds} round(s), {rounds_shown}",
        "mitmproxy": f"{mitmproxy.version.VERSION}, Python {sys.version.split()[0]}",
        "outpost": f"one process, three proxy providers picked by Host: bench.{OUTPOST_DOMAIN} with 1 skip rule "
                   f"(`^{SKIP_PATH}`), skip.{OUTPOST_DOMAIN} with {SKIP_RULES} (`^{SKIP_PATH}section-<i>/`, "
                   f"i < {SKIP_RULES}; none matches /bench), header.{OUTPOST_DOMAIN} (1 rule, header auth)",
        "header auth": "provider with `verify_bearer_jwt_locally: true`, `Authorization: Bearer <ID token of the "
                       "IdP for its client>` and no cookie; the warm-up fills the cache (header_auth_cache_ttl "
                       "default)",
    }
    if any(key.startswith("fwd_") for key in setups):
        info["forward auth"] = (f"nginx (1 worker) with {FORWARD_TEMPLATE}, except `upstream {{ keepalive "
                                f"{KEEPALIVE}; }}` to the auth server and to the upstream, HTTP/1.1 and "
                                f"`Connection: \"\"` to the auth server; outpost provider mode forward_single")
    if ("apache" in setups or "fwd_apache" in setups) and started.apache:
        info["Apache"] = describe_apache(started.apache[0])
    info["lean runner"] = ("`PYTHONPATH=addons python -m mitm_outpost` with the --set options of the mitmdump "
                           "outpost; provider bench (1 skip rule); `outpost_access_log=off` except the 'access log "
                           "json' row (default JSON lines to stderr, here a file); metrics_port=0 on every outpost")
    if "lean_start" in setups:
        info["login rows"] = (f"a lean runner of their own (provider bench, access log off), no cookie: "
                              f"{START_PATH}, and /bench without a session (302 to {START_PATH})")
    return info


def print_after_table(args: argparse.Namespace, load: Load, rounds: dict[str, list[Result]],
                      started: Started) -> None:
    """The /start figures, the skip rules alone, the lean runner's RSS and the profile's summary."""
    setups = started.setups
    if "lean_start" in setups and "lean_redirect" in setups:
        print("\n".join(login_flood(args, load, rounds, setups, started.probe)), flush=True)
    print("\n## Skip rules alone: RE2 search per request, best of 5 × 200,000 calls\n\n"
          "A signed-in request in proxy mode never reaches the rules (the session is checked first), so the "
          "req/s rows above compare equal work; this is what the rules cost where they are tested.\n")
    print("\n".join(skip_rule_cost()), flush=True)
    if (lean := setups.get("lean")) and "lean_log" in setups:
        signed_in, access_log = (rss_bytes(s.pid) / MIB for s in (lean, setups["lean_log"]))  # type: ignore[arg-type]
        print(f"\nLean runner (signed-in row) RSS after the rounds: {signed_in:.1f} MiB "
              f"(access-log row: {access_log:.1f} MiB)", flush=True)
    if args.profile:
        print_profile(args, rounds, setups, args.duration // args.slices)


def print_extras(args: argparse.Namespace, load: Load, bench: Bench) -> None:
    """Memory per session, sign-out, reload and, with Redis and nginx, the replicas."""
    redis_port = print_memory(args, bench)
    print("\n".join(signout_lines(args)), flush=True)
    print("\n".join(reload_lines(args, bench)), flush=True)
    nginx = find_nginx()
    if redis_port is not None and nginx:
        print("\n## Two lean replicas sharing Redis behind nginx\n", flush=True)
        print("\n".join(replicas(args, load, bench, nginx, redis_port)), flush=True)


def run(args: argparse.Namespace, load: Load, procs: Processes, tmp: Path, loadavg: str) -> None:
    """Start all servers, sign in, then measure every setup in turn, `--rounds` times, and report.
    The servers not under load sit idle in epoll, so they cost the measured one nothing."""
    mtime = addons_mtime()
    idp = procs.adopt(DevIdP(users_file=ROOT / "scripts/demo/users.yaml"))
    bench = Bench(procs, tmp, free_port(), idp.url)
    started = start_setups(args, bench)
    rounds = measure(args, load, bench, started.setups, mtime)
    check_still_signed_in(started.setups, mtime)
    report(rounds, describe(args, load, loadavg, started), short=args.duration < 5)
    print_after_table(args, load, rounds, started)
    t0 = time.monotonic()
    if args.soak and (lean := started.setups.get("lean")):
        print("\n## Soak\n", flush=True)
        print("\n".join(soak(args, bench, lean, median(rounds["lean"]).rps)), flush=True)
    if args.no_extras:
        return
    print_extras(args, load, bench)
    print(f"\n(memory, sign-out, reload, Redis, replica{', soak' if args.soak else ''} measurements took "
          f"{time.monotonic() - t0:.0f} s)")
