"""The load tool: wrk (p50/p99 from --latency) or, failing that, h2load in HTTP/1.1 mode; a `Result` per
measurement, with the CPU the process under test spent meanwhile, and the slices of a round added up."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .processes import cpu_seconds


@dataclass
class Result:
    name: str
    command: str  # the load tool's
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: str = ""
    cpu: float | None = None  # CPU seconds per wall second of the process under test
    server: str = ""  # the command of the process under test
    requests: int | None = None  # answered during the measurement (wrk)


# wrk counts only 4xx/5xx as errors, but a lost session shows up as 3xx (a login redirect): this
# counts every answer that is not 200 (wrk calls `response` only when a script defines it, which
# costs wrk a little CPU per answer, so the direct measurement goes without).
NON_200_SCRIPT = """\
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non200 = 0 end
function response(status, headers, body) if status ~= 200 then non200 = non200 + 1 end end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("non200") end
  io.write(string.format("Non-200 responses: %d\\n", n))
end
"""


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> Result:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = "; ".join(m.strip() for m in re.findall(r"^\s*(Socket errors:.*|Non-2xx or 3xx responses:.*)$",
                                                     out, re.M))
    non_200 = re.search(r"^Non-200 responses: ([1-9]\d*)$", out, re.M)
    if non_200:
        errors = "; ".join(filter(None, [errors, f"{non_200.group(1)} answers not 200"]))
    count = re.search(r"^\s*(\d+) requests in", out, re.M)
    return Result("", "", rps, parse_ms(pct["50"]) if "50" in pct else None,
                  parse_ms(pct["99"]) if "99" in pct else None, errors,
                  requests=int(count.group(1)) if count else None)


def parse_h2load(out: str) -> Result:
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    counts = re.findall(r"(\d+) (failed|errored|timeout|3xx|4xx|5xx)\b", out)  # h2load counts 3xx too
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", out)
    return Result("", "", rps, None, None, ", ".join(f"{n} {what}" for n, what in counts if int(n)),
                  requests=int(done.group(1)) if done else None)


def shown(argv: list[str], headers: list[str] | tuple[str, ...]) -> str:
    """A load tool's command as the report prints it: the session cookie and the bearer token left out."""
    text = shlex.join(argv)
    for header in headers:
        if header.startswith("Cookie:"):
            text = text.replace(header, "Cookie: <session>")
        elif header.startswith("Authorization: Bearer "):
            text = text.replace(header, "Authorization: Bearer <JWT>")
    return text


class Load:
    """wrk (p50/p99 from --latency) or, failing that, h2load in HTTP/1.1 mode (mean only)."""

    def __init__(self, connections: int, threads: int, tool: str = "auto") -> None:
        self.connections, self.threads = connections, threads
        self.wrk = shutil.which("wrk") if tool in ("auto", "wrk") else None
        self.h2load = shutil.which("h2load") if tool in ("auto", "h2load") else None
        if not (self.wrk or self.h2load):
            sys.exit("no load tool: install wrk (apt-get install wrk) or h2load (apt-get install nghttp2-client)")

    def version(self) -> str:
        if self.wrk:
            out = subprocess.run([self.wrk, "-v"], capture_output=True, text=True)
            return (out.stdout + out.stderr).split("[")[0].strip() or "wrk"
        return subprocess.run([self.h2load, "--version"], capture_output=True, text=True).stdout.strip()

    def argv(self, url: str, seconds: int, headers: list[str], script: Path | None = None) -> list[str]:
        h = [arg for header in headers for arg in ("-H", header)]
        c, t = str(self.connections), str(self.threads)
        if self.wrk:
            s = ["-s", str(script)] if script else []
            return [self.wrk, f"-t{t}", f"-c{c}", f"-d{seconds}s", "--latency", *s, *h, url]
        return [self.h2load, "--h1", "-D", str(seconds), "-c", c, "-t", t, *h, url]  # counts 3xx itself

    def run(self, name: str, url: str, seconds: int, headers: list[str], warmup: int, pid: int | None,
            script: Path | None = None) -> Result:
        """`script`: a wrk Lua script (NON_200_SCRIPT) whose count of non-200 answers lands in `errors`."""
        if warmup:
            self._run(self.argv(url, warmup, headers, script), warmup)
        argv = self.argv(url, seconds, headers, script)
        cpu0, t0 = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
        out = self._run(argv, seconds)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) if pid else None
        result = parse_wrk(out) if self.wrk else parse_h2load(out)
        result.name, result.command, result.cpu = name, shown(argv, headers), cpu
        return result

    @staticmethod
    def _run(argv: list[str], seconds: int) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rps)[(len(results) - 1) // 2]


def combine(slices: list[Result], seconds: int) -> Result:
    """One round of a setup from its slices (of `seconds` each): req/s and CPU over all of them,
    the median slice's p50 and p99 (percentiles of different runs do not add up)."""
    if len(slices) == 1:
        return slices[0]
    first, mid = slices[0], median(slices)
    requests = sum(r.requests or round(r.rps * seconds) for r in slices)
    cpu = [r.cpu for r in slices if r.cpu is not None]
    return Result(first.name, first.command, requests / (seconds * len(slices)), mid.p50_ms, mid.p99_ms,
                  "; ".join(r.errors for r in slices if r.errors), sum(cpu) / len(cpu) if cpu else None,
                  first.server, requests)
