"""--profile: py-spy records the process under test during the first round's warm-up and first slice, and
its collapsed stacks (.txt) become CPU time per request, ours against mitmproxy's and the rest."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from mitm_outpost.testing.processes import Child

from .load import Result
from .processes import Processes
from .shared import VENV_BIN, Setup

RATE = 250  # py-spy samples per second


def profile(args: argparse.Namespace, procs: Processes, pid: int, seconds: int) -> Child:
    """py-spy samples the process under test (the outpost by default, see --profile-setup) for one
    warm-up and measurement, without pausing it (--nonblocking), so it costs that process little;
    that round's numbers are still a bit lower."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not spy:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    fmt = {".svg": "flamegraph", ".txt": "raw"}.get(Path(args.profile).suffix, "speedscope")
    return procs.start("py-spy", [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", str(RATE),
                                  "--duration", str(seconds), "--format", fmt, "-o", str(Path(args.profile).resolve())])


def _area(frame: str, ours: str) -> str:
    return "ours" if f"{ours}/" in frame else "mitmproxy" if "mitmproxy/" in frame else "other"


def summarize_profile(path: Path, requests: int, ours: str = "mitm_outpost") -> list[str]:
    """From py-spy's raw (collapsed) stacks: CPU time per request by self time of each function (line
    numbers dropped), split into our code (addons/mitm_outpost), mitmproxy and the rest; and the
    inclusive time of our hooks (stacks through one of our functions, the runner's main() aside)."""
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    in_ours = total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_time[frames[-1]] += n
        mine = {f for f in frames if f"{ours}/" in f and f"{ours}/__main__.py" not in f}
        for f in mine:
            incl[f] += n
        in_ours += n if mine else 0

    def us(samples: int) -> float:
        return samples / RATE / requests * 1e6

    by_area: Counter[str] = Counter()
    for f, n in self_time.items():
        by_area[_area(f, ours)] += n
    lines = [f"py-spy, {total} samples at {RATE}/s over {requests:,} requests: {us(total):.0f} µs of CPU per "
             f"request; self time: ours {us(by_area['ours']):.0f} µs, mitmproxy {us(by_area['mitmproxy']):.0f} µs, "
             f"other (asyncio, stdlib...) {us(by_area['other']):.0f} µs; inside our hooks, inclusive of what they "
             f"call: {us(in_ours):.0f} µs",
             "", "| top self time (function) | area | µs / request |", "|---|---|---:|"]
    for f, n in self_time.most_common(15):
        lines.append(f"| `{f}` | {_area(f, ours)} | {us(n):.1f} |")
    lines += ["", "| our functions, inclusive | µs / request |", "|---|---:|"]
    for f, n in incl.most_common(12):
        lines.append(f"| `{f}` | {us(n):.1f} |")
    return lines


def print_profile(args: argparse.Namespace, rounds: dict[str, list[Result]], setups: dict[str, Setup],
                  slice_seconds: int) -> None:
    """The profile's summary, when it was recorded as collapsed stacks (.txt)."""
    key = args.profile_setup
    if Path(args.profile).suffix == ".txt" and (first := rounds[key][0]).requests:
        # py-spy covered the warm-up and the first slice: count them at the measured rate
        requests = int(first.rps * (args.warmup + slice_seconds))
        print(f"\n## Profile of {setups[key].label} (first round, warm-up + first slice)\n")
        print("\n".join(summarize_profile(Path(args.profile), requests)))
