"""Benchmark the outpost against its two ceilings in one run (run it through `scripts/bench`).

Every number here comes from the same upstream, the same load tool and the same options,
measured one after the other in rounds (medians are reported), because figures from different
runs, machines or tools do not compare (see the spec's runnable-peers §7: stock mitmdump is CPU-bound at a few hundred req/s
on a 2-core VM, so only the ratio to bare mitmdump says what our addons cost):

  direct   load tool -> upstream                        (the machine's ceiling)
  bare     load tool -> mitmdump --mode reverse -> upstream (mitmproxy's own cost)
  outpost  load tool -> mitmdump -s addons/outpost.py -> upstream, with a signed-in session
           cookie, so each request walks the whole addon chain and gets identity headers.

The upstream answers `hello <X-authentik-username>`, so a body of "hello alice" proves that a
request went through the outpost, as alice, to the upstream (and not to a login redirect).
"""

import argparse
import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx2
import mitmproxy.version

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
SESSION_COOKIE = re.compile(r"^authentik_proxy_[0-9a-f]{8}$")
USER = "alice"  # defined in scripts/demo/users.yaml
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


# ---------------------------------------------------------------- processes


class Processes:
    """Every process we start, each in its own session so that stopping it also stops its
    children (nginx workers); `stop_all` runs in a `finally`, so nothing outlives the bench."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True)
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs[:]):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = (self.logdir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def free_port() -> int:
    """A port the kernel picks at random from the free ephemeral range."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, procs: Processes, proc: subprocess.Popen, expect: int = 200, timeout: float = 30) -> None:
    """Poll until `url` answers `expect`; fail early, with its log, if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.name} exited ({proc.returncode}):\n{procs.log_tail(proc.name)}")  # type: ignore[attr-defined]
        try:
            if httpx2.get(url, timeout=1).status_code == expect:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit(f"{url} did not answer {expect} within {timeout:.0f} s:\n{procs.log_tail(proc.name)}")  # type: ignore[attr-defined]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


# ---------------------------------------------------------------- upstream

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        location / {{ default_type text/plain; return 200 "hello $http_x_authentik_username\\n"; }}
    }}
}}
"""


def start_upstream(procs: Processes, tmp: Path, port: int) -> tuple[str, list[str]]:
    """nginx when installed (it never is the bottleneck), else the asyncio server below."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx:
        d = tmp / "nginx"
        d.mkdir()
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, host=HOST, port=port))
        argv = [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
        kind = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    else:
        argv = [sys.executable, __file__, "--serve-upstream", str(port)]
        kind = "python asyncio server (nginx not installed)"
    wait_http(f"http://{HOST}:{port}/", procs, procs.start("upstream", argv))
    return kind, argv


async def serve_upstream(port: int) -> None:
    """Fallback upstream: HTTP/1.1 keep-alive, 200 `hello <X-authentik-username>` to every request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                user, length = b"", 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"x-authentik-username":
                        user = value.strip()
                    elif name == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                body = b"hello " + user + b"\n"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------- load tool


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


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

    def argv(self, url: str, seconds: int, headers: list[str]) -> list[str]:
        h = [arg for header in headers for arg in ("-H", header)]
        c, t = str(self.connections), str(self.threads)
        if self.wrk:
            return [self.wrk, f"-t{t}", f"-c{c}", f"-d{seconds}s", "--latency", *h, url]
        return [self.h2load, "--h1", "-D", str(seconds), "-c", c, "-t", t, *h, url]

    def run(self, name: str, url: str, seconds: int, headers: list[str], warmup: int, pid: int | None) -> Result:
        if warmup:
            self._run(self.argv(url, warmup, headers), warmup)
        argv = self.argv(url, seconds, headers)
        cpu0, t0 = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
        out = self._run(argv, seconds)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) if pid else None
        shown = shlex.join(argv).replace(headers[0], "Cookie: <session>") if headers else shlex.join(argv)
        result = self._parse_wrk(out) if self.wrk else self._parse_h2load(out)
        result.name, result.command, result.cpu = name, shown, cpu
        return result

    @staticmethod
    def _run(argv: list[str], seconds: int) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    @staticmethod
    def _parse_wrk(out: str) -> Result:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
        errors = "; ".join(m.strip() for m in re.findall(r"^\s*(Socket errors:.*|Non-2xx or 3xx responses:.*)$", out, re.M))
        return Result("", "", rps, parse_ms(pct["50"]) if "50" in pct else None,
                      parse_ms(pct["99"]) if "99" in pct else None, errors)

    @staticmethod
    def _parse_h2load(out: str) -> Result:
        rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
        counts = re.findall(r"(\d+) (failed|errored|timeout|3xx|4xx|5xx)\b", out)  # h2load counts 3xx too
        return Result("", "", rps, None, None, ", ".join(f"{n} {what}" for n, what in counts if int(n)))


# ---------------------------------------------------------------- outpost and login

OUTPOST_CONFIG = """\
outpost:
  name: mitm-outpost bench
providers:
  - name: bench
    mode: proxy
    external_host: http://{host}:{port}
    internal_host: http://{host}:{upstream}
    issuer: http://{host}:{idp}
    client_id: bench-client
    client_secret: bench-secret
    access_token_validity: 3600
"""


def log_in(origin: str) -> str:
    """Sign in as alice like a browser would and return the `Cookie:` value of the session.

    protected URL -> 302 /outpost.goauthentik.io/start -> 302 IdP authorize -> POST sub=alice
    -> 302 our callback -> 302 back to the protected URL.
    """
    def follow(response: httpx2.Response, expect: str) -> str:
        location = urllib.parse.urljoin(str(response.url), response.headers.get("location", ""))
        if response.status_code != 302 or expect not in location:
            sys.exit(f"login: {response.request.method} {response.url} answered {response.status_code} "
                     f"-> {location!r}, expected a 302 to ...{expect}...\n{response.text[:500]}")
        return location

    with httpx2.Client(follow_redirects=False, timeout=10) as browser:
        html = {"Accept": "text/html"}
        start = follow(browser.get(origin + "/bench", headers=html), "/outpost.goauthentik.io/start")
        authorize = follow(browser.get(start, headers=html), "/authorize")
        callback = follow(browser.post(authorize, data={"sub": USER}, headers=html), "/outpost.goauthentik.io/callback")
        follow(browser.get(callback, headers=html), origin + "/bench")
        cookies = [f"{c.name}={c.value}" for c in browser.cookies.jar if SESSION_COOKIE.match(c.name)]
    if len(cookies) != 1:
        sys.exit(f"login: expected one session cookie authentik_proxy_<8hex>, got {cookies}")
    return cookies[0]


def check_proxied(url: str, cookie: str) -> None:
    """One request with only the session cookie must reach the upstream as alice (not a 302)."""
    r = httpx2.get(url, headers={"Cookie": cookie}, timeout=10)
    if r.status_code != 200 or r.text.strip() != f"hello {USER}":
        sys.exit(f"session check: {url} answered {r.status_code} {r.headers.get('location', '')} {r.text[:200]!r}, "
                 f"expected 200 'hello {USER}' from the upstream")


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rps)[(len(results) - 1) // 2]


def report(rounds: dict[str, list[Result]], info: dict[str, str]) -> None:
    """Each setup's median round; the ratios of medians, and per round when there are several."""
    results = {key: median(rs) for key, rs in rounds.items()}
    direct, bare, outpost = results["direct"], results["bare"], results["outpost"]
    print("\n## mitm-outpost benchmark\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print("\n| setup | req/s | p50 | p99 | proxy CPU (s/s) | proxy CPU per request | errors |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results.values():
        cpu_ms = 1000 * r.cpu / r.rps if r.cpu else None
        print(f"| {r.name} | {r.rps:,.0f} | {fmt(r.p50_ms, '.2f', ' ms')} | {fmt(r.p99_ms, '.2f', ' ms')} "
              f"| {fmt(r.cpu, '.2f')} | {fmt(cpu_ms, '.2f', ' ms')} | {r.errors or 'none'} |")
    ratio = outpost.rps / bare.rps
    per_round = ", ".join(f"{o.rps / b.rps:.2f}" for o, b in zip(rounds["outpost"], rounds["bare"]))
    print("\n| ratio (req/s) | value | per round | target |")
    print("|---|---:|---|---|")
    print(f"| outpost / bare mitmdump | {ratio:.2f} | {per_round} | >= 0.90 {'✓' if ratio >= 0.9 else '✗'} |")
    print(f"| bare mitmdump / direct | {bare.rps / direct.rps:.4f} | | – |")
    print(f"| outpost / direct | {outpost.rps / direct.rps:.4f} | | – |")
    print("\nCommands (ports are picked per run):\n")
    for r in results.values():
        print(f"- {r.name}: `{r.command}`\n  against `{r.server}`")


# ---------------------------------------------------------------- main


def profile(args: argparse.Namespace, procs: Processes, pid: int) -> subprocess.Popen:
    """py-spy samples the outpost for one warm-up and measurement, without pausing it
    (--nonblocking), so it costs the outpost little; that round's numbers are still a bit lower."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not spy:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    fmt = {".svg": "flamegraph", ".txt": "raw"}.get(Path(args.profile).suffix, "speedscope")
    return procs.start("py-spy", [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "250", "--duration",
                                  str(args.warmup + args.duration), "--format", fmt, "-o", str(Path(args.profile).resolve())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per measurement, 1 s warm-up (whole run < 1 min)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of discarded load before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements; medians are "
                        "reported, since a neighbour's burst of CPU can halve one measurement (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="open connections (default 16, as in spec §7)")
    parser.add_argument("--threads", type=int, default=1, help="load tool threads (default 1)")
    parser.add_argument("--load-tool", choices=["auto", "wrk", "h2load"], default="auto", help="default: wrk if installed")
    parser.add_argument("--profile", metavar="FILE", help="record the outpost under load (first round) with py-spy "
                        "(.venv/bin/pip install py-spy) into FILE: .svg flame graph, .txt collapsed stacks, else speedscope JSON")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
        return
    if args.quick:
        args.duration, args.warmup = 3, 1
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


@dataclass
class Setup:
    label: str
    url: str
    server: list[str]  # the command of the process under test
    pid: int | None = None  # whose CPU time is measured (the proxies)
    headers: tuple[str, ...] = ()


def run(args: argparse.Namespace, load: Load, procs: Processes, tmp: Path, loadavg: str) -> None:
    """Start all servers, sign in, then measure direct, bare, outpost in turn, `--rounds` times.
    The servers not under load sit idle in epoll, so they cost the measured one nothing."""
    up_port, bare_port, outpost_port, idp_port = (free_port() for _ in range(4))
    mitmdump = str(VENV_BIN / "mitmdump")
    confdir = f"confdir={tmp / 'mitm'}"  # a private CA and default cert: nothing lands in ~/.mitmproxy

    upstream_kind, upstream_argv = start_upstream(procs, tmp, up_port)
    upstream = f"http://{HOST}:{up_port}"

    bare_argv = [mitmdump, "-q", "--set", confdir, "--listen-host", HOST, "--mode", f"reverse:{upstream}@{bare_port}"]
    bare = procs.start("bare-mitmdump", bare_argv)
    wait_http(f"http://{HOST}:{bare_port}/", procs, bare)

    idp = procs.start("idp", [str(VENV_BIN / "oidc-provider-mock"), "--port", str(idp_port),
                              "--user-claims-file", "scripts/demo/users.yaml"])
    wait_http(f"http://{HOST}:{idp_port}/.well-known/openid-configuration", procs, idp)
    config = tmp / "outpost.yaml"
    config.write_text(OUTPOST_CONFIG.format(host=HOST, port=outpost_port, upstream=up_port, idp=idp_port))
    outpost_argv = [mitmdump, "-q", "-s", "addons/outpost.py", "--set", confdir, "--set", f"outpost_config={config}",
                    "--set", f"outpost_http_port={outpost_port}", "--set", "outpost_https_port=0",
                    "--set", f"outpost_listen_host={HOST}", "--set", "listen_port=0"]
    outpost = procs.start("outpost", outpost_argv)
    origin = f"http://{HOST}:{outpost_port}"
    wait_http(origin + "/outpost.goauthentik.io/ping", procs, outpost, expect=204)
    cookie = log_in(origin)
    check_proxied(origin + "/bench", cookie)
    print(f"signed in as {USER}: session cookie {cookie.split('=')[0]}, upstream answers 'hello {USER}'", flush=True)

    setups = {
        "direct": Setup("direct (upstream)", upstream + "/bench", upstream_argv),
        "bare": Setup("bare mitmdump", f"http://{HOST}:{bare_port}/bench", bare_argv, bare.pid),
        "outpost": Setup("outpost (signed in)", origin + "/bench", outpost_argv, outpost.pid, (f"Cookie: {cookie}",)),
    }
    rounds: dict[str, list[Result]] = {key: [] for key in setups}
    for n in range(args.rounds):
        for key, s in setups.items():
            print(f"round {n + 1}/{args.rounds}, {s.label}: {s.url} ({args.warmup} s warm-up + {args.duration} s)", flush=True)
            spy = profile(args, procs, s.pid) if args.profile and key == "outpost" and n == 0 else None  # type: ignore[arg-type]
            r = load.run(s.label, s.url, args.duration, list(s.headers), args.warmup, s.pid)
            r.server = shlex.join(s.server)
            rounds[key].append(r)
            print(f"  {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}{', ' + r.errors if r.errors else ''}", flush=True)
            if spy:
                spy.wait(30)
                print(f"  profile of the outpost under load: {args.profile}", flush=True)
    check_proxied(origin + "/bench", cookie)  # still signed in: no number came from login redirects
    report(rounds, {
        "nproc": str(len(os.sched_getaffinity(0))),
        "load average before the run": loadavg,
        "upstream": upstream_kind,
        "load tool": f"{load.version()}, {args.threads} thread(s), {args.connections} connections, "
                     f"{args.warmup} s warm-up + {args.duration} s per measurement, {args.rounds} round(s), median shown",
        "mitmproxy": f"{mitmproxy.version.VERSION}, Python {sys.version.split()[0]}",
    })


if __name__ == "__main__":
    main()
