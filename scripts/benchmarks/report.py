"""The throughput report: each setup's median round, the ratios of medians (and per round) with their targets,
and the commands that made the numbers."""

from __future__ import annotations

from typing import NamedTuple

from .load import Result, median
from .skip_rules import SKIP_RULES


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def met(ok: bool) -> str:
    return "✓" if ok else "✗ missed"


class Ratio(NamedTuple):
    """A row of the ratio table: req/s of setup `num` over setup `den` (keys of the rounds), printed when
    both were measured; `target` (and the stretch `goal`) marked ✓ or ✗, or none ("–")."""
    label: str
    num: str
    den: str
    target: float | None = None
    goal: float | None = None


# The ratios printed after the hand-made rows of print_ratios(); a new setup's ratio is one line here.
RATIOS = (
    Ratio("lean runner, signed in / bare mitmdump -q", "lean", "bare", 1.5, 2.0),
    Ratio("lean runner, no auth (skip rule) / bare mitmdump -q", "lean_skip", "bare"),
    Ratio("lean runner, access log json / access log off", "lean_log", "lean"),
    Ratio("lean runner, signed in / outpost under mitmdump", "lean", "outpost"),
    Ratio("nginx auth_request: lean runner / bare mitmdump", "fwd_lean", "fwd_bare", 2.0),
    Ratio("nginx auth_request: outpost (lean runner) / Apache", "fwd_lean", "fwd_apache"),
    Ratio("nginx auth_request: outpost (--workers auto) / Apache", "fwd_workers", "fwd_apache", 1.0),
    Ratio("outpost (lean runner, proxy mode) / Apache proxy mode", "lean", "apache"),
    Ratio("outpost (--workers 2, proxy mode) / Apache proxy mode", "lean_w2", "apache"),
    Ratio("proxy mode: --workers 2 / --workers 1 (Redis)", "lean_w2", "lean_w1", 1.7),
)


def per_round(rounds: dict[str, list[Result]], num: str, den: str) -> str:
    """The ratio of two setups round by round."""
    return ", ".join(f"{a.rps / b.rps:.2f}" for a, b in zip(rounds[num], rounds[den]))


def ratio_line(ratio: Ratio, rounds: dict[str, list[Result]], results: dict[str, Result]) -> str:
    """`| label | median ratio | per round | target |`: the ratio of the medians, then round by round."""
    value = results[ratio.num].rps / results[ratio.den].rps
    if ratio.target is None:
        mark = "–"
    else:
        mark = f">= {ratio.target:.1f}" + (f" (goal >= {ratio.goal:.1f})" if ratio.goal else "") + " " + (
            "✓✓" if ratio.goal and value >= ratio.goal else "✓" if value >= ratio.target else "✗ missed")
    return f"| {ratio.label} | {value:.2f} | {per_round(rounds, ratio.num, ratio.den)} | {mark} |"


def print_table(results: dict[str, Result], info: dict[str, str]) -> None:
    print("\n## mitm-outpost benchmark\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print("\n| setup | req/s | p50 | p99 | proxy CPU (s/s) | proxy CPU per request | errors |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results.values():
        cpu_ms = 1000 * r.cpu / r.rps if r.cpu else None
        print(f"| {r.name} | {r.rps:,.0f} | {fmt(r.p50_ms, '.2f', ' ms')} | {fmt(r.p99_ms, '.2f', ' ms')} "
              f"| {fmt(r.cpu, '.2f')} | {fmt(cpu_ms, '.2f', ' ms')} | {r.errors or 'none'} |")
    if any(key.startswith("fwd_") for key in results):
        print("\nForward-auth rows: req/s through nginx, proxy CPU = the auth server's (outpost, bare mitmdump or "
              "Apache), not nginx's.")
    if "apache" in results or "fwd_apache" in results:
        print("Apache rows: proxy CPU = Apache's master and its child processes (the event MPM serves from the "
              "children).")


def print_ratios(rounds: dict[str, list[Result]], results: dict[str, Result]) -> None:
    direct, bare, outpost = results["direct"], results["bare"], results["outpost"]
    ratio = outpost.rps / bare.rps
    print("\n| ratio (req/s) | value | per round | target |")
    print("|---|---:|---|---|")
    print(f"| outpost / bare mitmdump | {ratio:.2f} | {per_round(rounds, 'outpost', 'bare')} "
          f"| >= 0.90 {'✓' if ratio >= 0.9 else '✗'} |")
    if "outpost_skip" in results:
        skip = results["outpost_skip"].rps / outpost.rps
        print(f"| outpost: {SKIP_RULES} skip rules / 1 rule | {skip:.2f} "
              f"| {per_round(rounds, 'outpost_skip', 'outpost')} | >= 0.95 {'✓' if skip >= 0.95 else '✗'} |")
    if "outpost_header" in results:
        header = results["outpost_header"].rps / outpost.rps
        print(f"| outpost: header auth (warm cache) / signed-in cookie | {header:.2f} "
              f"| {per_round(rounds, 'outpost_header', 'outpost')} | – |")
    if "fwd_outpost" in results:
        fwd = results["fwd_outpost"].rps / results["fwd_bare"].rps
        mark = "✓✓" if fwd >= 2.0 else "✓" if fwd >= 1.0 else "✗"
        print(f"| nginx auth_request: outpost / bare mitmdump | {fwd:.2f} "
              f"| {per_round(rounds, 'fwd_outpost', 'fwd_bare')} | >= 1.0 (goal >= 2.0) {mark} |")
    for row in RATIOS:
        if row.num in results and row.den in results:
            print(ratio_line(row, rounds, results))
    if (check := results.get("fwd_lean")) and check.cpu:
        per_check = [1e6 * r.cpu / r.rps for r in rounds["fwd_lean"] if r.cpu]
        us = 1e6 * check.cpu / check.rps
        print(f"| outpost CPU per forward-auth check, one process (fast lane) | {us:.0f} µs "
              f"| {', '.join(f'{c:.0f}' for c in per_check)} | <= 150 µs {'✓' if us <= 150 else '✗ missed'} |")
    print(f"| bare mitmdump / direct | {bare.rps / direct.rps:.4f} | | – |")
    print(f"| outpost / direct | {outpost.rps / direct.rps:.4f} | | – |")
    if "lean" in results:
        print(f"| lean runner, signed in / nginx direct | {results['lean'].rps / direct.rps:.4f} | | – |")


def report(rounds: dict[str, list[Result]], info: dict[str, str], short: bool = False) -> None:
    """Each setup's median round; the ratios of medians, and per round when there are several."""
    results = {key: median(rs) for key, rs in rounds.items()}
    outpost = results["outpost"]
    print_table(results, info)
    print_ratios(rounds, results)
    if "outpost_header" in results:
        h = results["outpost_header"]
        print(f"\nHeader auth (warm cache): {h.rps:,.0f} req/s, p99 {fmt(h.p99_ms, '.2f', ' ms')}, "
              f"{h.rps / outpost.rps:.2f} × the signed-in cookie row ({outpost.rps:,.0f} req/s, "
              f"p99 {fmt(outpost.p99_ms, '.2f', ' ms')}).")
    if short:
        print("\nShort measurements (--quick) swing by ±20 % and more from round to round on a small VM (see per "
              "round): judge the few-% targets, such as skip rules >= 0.95, on a default run.")
    print("\nCommands (ports are picked per run):\n")
    for r in results.values():
        print(f"- {r.name}: `{r.command}`\n  against `{r.server}`")
