"""The unauthenticated-path rules of the outpost rows (1 rule, and SKIP_RULES of them, none matching the
benchmarked path), and what the rules alone cost, timed in-process."""

from __future__ import annotations

import timeit

from mitm_outpost.provider import compile_skip_rules

SKIP_PATH = "/public/"  # the one rule of the signed-in outpost: ^/public/ (never the benchmarked /bench)
SKIP_RULES = 100  # the many-rules outpost: ^/public/section-<i>/ for i < SKIP_RULES, none matching /bench


def skip_rules_yaml(count: int) -> str:
    """`skip_path_regex` with `count` distinct anchored rules, none of which matches /bench."""
    if count == 1:
        return f'    skip_path_regex: "^{SKIP_PATH}"\n'
    return "    skip_path_regex: |\n" + "".join(f"      ^{SKIP_PATH}section-{i}/\n" for i in range(count))


def skipped_path(count: int) -> str:
    """A path the last of `count` rules lets through without identity (proves the rules were loaded)."""
    return f"{SKIP_PATH}x" if count == 1 else f"{SKIP_PATH}section-{count - 1}/x"


def skip_rule_cost() -> list[str]:
    """The rules alone, in this process: Provider.is_skipped with the bench's 1 rule and its
    SKIP_RULES rules (one RE2 program each), on the paths a request of each kind tests. Timed
    in-process because a few hundred ns hide in the ±20 % of any req/s figure here."""
    one = compile_skip_rules(f"^{SKIP_PATH}", "bench")
    many = compile_skip_rules("".join(f"^{SKIP_PATH}section-{i}/\n" for i in range(SKIP_RULES)), "skip")
    cases = (("/bench (no rule matches: the signed-in and login paths)", "/bench"),
             (f"{skipped_path(SKIP_RULES)} (the last rule matches)", skipped_path(SKIP_RULES)),
             ("a 2 KiB path no rule matches", "/" + "a/" * 1024))
    lines = [f"| path tested | 1 rule | {SKIP_RULES} rules | {SKIP_RULES} / 1 |", "|---|---:|---:|---:|"]
    for label, path in cases:
        ns = []
        for rules in (one, many):
            number = 200_000
            best = min(timeit.repeat(lambda: rules.search(path), number=number, repeat=5))
            ns.append(best / number * 1e9)
        lines.append(f"| {label} | {ns[0]:.0f} ns | {ns[1]:.0f} ns | {ns[1] / ns[0]:.2f} |")
    return lines
