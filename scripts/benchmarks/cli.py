"""The command line of `scripts/bench`: its options and their defaults (--quick's among them), the hidden
flags of the fresh-process probes, and the run in a temp dir whose children are stopped whatever happens."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

from . import __doc__ as overview
from .load import Load
from .memory import memory_probe
from .nginx import serve_upstream
from .processes import Processes
from .run import run
from .signout import run_signout_probe


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=overview.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 1 s warm-up, 1 round: thirteen "
                        "setups (fifteen with Apache), the signed-in probe next to a /start flood, memory, "
                        "sign-out at 100,000 sessions, "
                        "reload, Redis and replicas, whole run about 1.5-2 min (an explicit "
                        "--duration/--warmup/--rounds/--sessions/--signout-sessions wins; no soak unless --soak)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, help="seconds of discarded load before each measurement (default 3)")
    parser.add_argument("--rounds", type=int, help="rounds of the measurements; medians are "
                        "reported, since a neighbour's burst of CPU can halve one measurement (default 3, --quick 2)")
    parser.add_argument("--only", metavar="KEYS", help="measure only direct, bare, outpost and these setups "
                        "(comma-separated keys as for --profile-setup), e.g. --only outpost_skip")
    parser.add_argument("--slices", type=int, help="each round measures every setup in turn this many times, "
                        "duration/slices seconds each, and adds them up (default 5, --quick 1)")
    parser.add_argument("--connections", type=int, default=16, help="open connections (default 16, as in spec §7)")
    parser.add_argument("--threads", type=int, default=1, help="load tool threads (default 1)")
    parser.add_argument("--load-tool", choices=["auto", "wrk", "h2load"], default="auto",
                        help="default: wrk if installed")
    parser.add_argument("--profile", metavar="FILE", help="record the outpost (see --profile-setup) under load "
                        "(first round) with py-spy (.venv/bin/pip install py-spy) into FILE: .svg flame graph, "
                        ".txt collapsed stacks, else speedscope JSON")
    parser.add_argument("--profile-setup", choices=["outpost", "outpost_skip", "outpost_header", "fwd_outpost", "bare",
                                                    "fwd_bare", "lean", "lean_skip", "lean_log", "fwd_lean",
                                                    "lean_start", "lean_redirect"], default="outpost",
                        help="which process --profile records: the outpost in proxy mode (default), the outpost "
                        "behind nginx auth_request, the outpost with 100 skip rules or with header auth, or the "
                        "bare mitmdump of either mode, for comparison")
    parser.add_argument("--sessions", type=int, help="sessions for the memory measurements "
                        "(in-process MemoryStore and Redis; default 100000, --quick 10000)")
    parser.add_argument("--signout-sessions", type=int, help="sessions in the MemoryStore of the sign-out "
                        "measurement (default 1000000, the issue's figure; --quick 100000)")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="after the table, hold ~80 %% of the lean "
                        "runner's signed-in req/s for MINUTES (h2load --rps) and sample its RSS every 10 s")
    parser.add_argument("--no-extras", action="store_true", help="only the throughput table, the /start figures "
                        "(and --soak): no memory, sign-out, reload, Redis or replica measurements")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", metavar="MODE:N", help=argparse.SUPPRESS)
    parser.add_argument("--signout-probe", metavar="N:SECONDS", help=argparse.SUPPRESS)
    return parser


def apply_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The defaults that depend on --quick (an explicit value wins), and the combinations that make no sense."""
    quick = (2, 1) if args.quick else (10, 3)
    args.duration = quick[0] if args.duration is None else args.duration
    args.warmup = quick[1] if args.warmup is None else args.warmup
    args.rounds = (1 if args.quick else 3) if args.rounds is None else args.rounds
    args.slices = (1 if args.quick else 5) if args.slices is None else args.slices
    if args.only and args.soak and "lean" not in args.only.split(","):
        parser.error("--soak measures the lean runner: add lean to --only")
    if args.duration % args.slices:
        parser.error(f"--duration {args.duration} is not a whole number of seconds per slice "
                     f"(--slices {args.slices})")
    args.sessions = (10_000 if args.quick else 100_000) if args.sessions is None else args.sessions
    if args.signout_sessions is None:
        args.signout_sessions = 100_000 if args.quick else 1_000_000


def run_probe(args: argparse.Namespace) -> bool:
    """A hidden flag: this process is the fallback upstream or a fresh-process probe, not a run."""
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
    elif args.memory_probe:
        mode, n = args.memory_probe.split(":")
        memory_probe(mode, int(n))
    elif args.signout_probe:
        run_signout_probe(args.signout_probe)
    else:
        return False
    return True


def main() -> None:
    options = argument_parser()
    args = options.parse_args()
    if run_probe(args):
        return
    apply_defaults(options, args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the children

    load = Load(args.connections, args.threads, args.load_tool)
    loadavg = "%.2f %.2f %.2f" % os.getloadavg()  # other work on the machine skews every number
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp)
        try:
            run(args, load, procs, tmp, loadavg)
        finally:
            procs.stop_all()
