"""Benchmark the outpost against its two ceilings in one run (run it through `scripts/bench`).

Every number here comes from the same upstream, the same load tool and the same options,
measured one after the other in rounds (medians are reported), because figures from different
runs, machines or tools do not compare (see the spec's runnable-peers §7: stock mitmdump is CPU-bound at a few hundred req/s
on a 2-core VM, so only the ratio to bare mitmdump says what our addons cost):

  direct   load tool -> upstream                        (the machine's ceiling)
  bare     load tool -> mitmdump --mode reverse -> upstream (mitmproxy's own cost)
  outpost  load tool -> mitmdump -s addons/outpost.py -> upstream, with a signed-in session
           cookie, so each request walks the whole addon chain and gets identity headers; its provider
           has 1 unauthenticated-path rule (skip_path_regex ^/public/). The two rows below are other
           providers of the same outpost process (picked by Host), so only the configuration differs
  outpost, 100 skip rules   the same with 100 anchored rules (^/public/section-<i>/), none matching
           the benchmarked path: what a long skip list costs every request (target >= 0.95 of 1 rule)
  outpost, header auth      no cookie: `Authorization: Bearer <JWT>`, an ID token the dev IdP issued to
           the provider's client, verified locally (verify_bearer_jwt_locally); after the first request
           (the warm-up) every request is answered from the header-auth cache.

and forward auth (when nginx is installed), nginx configured like docs/forward-auth/nginx-single.conf
plus keep-alive to the auth server and to the upstream:

  fwd-bare     load tool -> nginx -> upstream, each request first asking, with auth_request,
               a bare mitmdump whose script answers 200 with an empty body (mitmproxy's own cost)
  fwd-outpost  the same, asking the outpost's /outpost.goauthentik.io/auth/nginx of a
               forward_single provider, with a session cookie got by signing in through nginx.

and the production runner, `python -m mitm_outpost` (PYTHONPATH=addons) with the same --set options:

  lean runner, no auth (skip rule)         /public/bench, matched by the provider's skip rule: no session
  lean runner, signed in                   outpost_access_log=off
  lean runner, signed in, access log json  the default access log (JSON lines to stderr, a file here)
  nginx auth_request → lean runner         the fwd-outpost setup, asked of the lean runner

and the peer an administrator picks today for OIDC in front of an app (issue 17), when Apache httpd and
mod_auth_openidc are installed: each its own Apache (event MPM, a private config in the temp dir, in the
foreground), client of the same dev IdP, signed in there by a real login, session in its shm cache:

  Apache mod_auth_openidc, proxy mode   load tool -> Apache (`ProxyPass /`, OIDCPassClaimsAs headers) -> upstream
  nginx auth_request → Apache           the fwd-outpost nginx config, asking an Apache location protected with
                                        `OIDCUnAuthAction 401` that answers an empty 200 with X-authentik-* headers

then (unless --no-extras) memory per session (a MemoryStore filled in a fresh process: RSS and
tracemalloc; RedisStore.put into a private redis-server: INFO memory), two lean runners sharing that
Redis behind nginx against one, with Redis commands per request (INFO commandstats), and with
--soak MINUTES the lean runner's RSS every 10 s at ~80 % of its signed-in req/s (h2load --rps).

and what issue 14 asks of login and state changes (see bench_state.py), on lean runners of their own:

  lean runner, /start                  wrk on /outpost.goauthentik.io/start without cookies: each request stores
                                       a pending login and answers 302 to the IdP (CPU per request, in the rounds)
  lean runner, no session: 302         a protected path without a session: 302 to /start, neither IdP nor store
                                       asked (the /start flood's req/s is compared to this one's)
  signed-in p99 next to a /start flood one client at PROBE_RATE req/s, alone and while wrk floods /start
  sign-out at --signout-sessions       an in-process MemoryStore (fresh process): delete_user of one user, and the
                                       longest event-loop stall during 100 sign-outs per second
  reload                               SIGHUP after a second provider whose issuer never answers was added: /ping
                                       latency from a client sending back to back for RELOAD_WINDOW s

The upstream answers `hello <X-authentik-username>`, so a body of "hello alice" proves that a
request went through the outpost, as alice, to the upstream (and not to a login redirect).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx2
import mitmproxy.version

import bench_state  # scripts/, next to this file (sys.path[0] when run as a script)

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
    requests: int | None = None  # answered during the measurement (wrk)


# ---------------------------------------------------------------- processes


class Processes:
    """Every process we start, each in its own session so that stopping it also stops its
    children (nginx workers); `stop_all` runs in a `finally`, so nothing outlives the bench."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True, env={**os.environ, **env} if env else None)
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


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (fields[1] is the parent's pid), None once it has gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of all its descendants: utime + stime, and cutime + cstime of the children
    it has reaped. Apache's work is done by the children of its master; a single-process server (mitmdump,
    the runner) has none, so for it this is its own time. (No /proc/<pid>/task/*/children here: /proc is walked.)"""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if fields := _stat_fields(p):
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
            todo += parents.get(p, [])
    return total / CLK_TCK


# ---------------------------------------------------------------- upstream

NGINX_MAIN = """\
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
{servers}
}}
"""

UPSTREAM_SERVER = """\
    server {{
        listen {host}:{port};
        location / {{ default_type text/plain; return 200 "hello $http_x_authentik_username\\n"; }}
    }}"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def start_nginx(procs: Processes, tmp: Path, name: str, nginx: str, servers: str) -> tuple[subprocess.Popen, list[str]]:
    """One nginx (master + 1 worker) with the given http{} content, its state under tmp/name."""
    d = tmp / name
    d.mkdir()
    (d / "nginx.conf").write_text(NGINX_MAIN.format(dir=d, servers=servers))
    argv = [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
    return procs.start(name, argv), argv


def start_upstream(procs: Processes, tmp: Path, port: int) -> tuple[str, list[str]]:
    """nginx when installed (it never is the bottleneck), else the asyncio server below."""
    nginx = find_nginx()
    if nginx:
        proc, argv = start_nginx(procs, tmp, "upstream", nginx, UPSTREAM_SERVER.format(host=HOST, port=port))
        kind = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    else:
        argv = [sys.executable, __file__, "--serve-upstream", str(port)]
        kind = "python asyncio server (nginx not installed)"
        proc = procs.start("upstream", argv)
    wait_http(f"http://{HOST}:{port}/", procs, proc)
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


# ---------------------------------------------------------------- forward auth

FORWARD_TEMPLATE = ROOT / "docs" / "forward-auth" / "nginx-single.conf"
FORWARD_DOMAIN = "example.test"  # the app is app.example.test:<nginx port>; every name is 127.0.0.1 here
KEEPALIVE = 16  # idle connections nginx keeps open to the auth server and to the upstream

BARE_AUTH_SCRIPT = """\
# The reference auth server: mitmdump itself, answering every auth_request 200 with an empty body.
from mitmproxy import http


def request(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(200)
"""


def forward_auth_servers(port: int, auth_port: int, upstream_port: int) -> str:
    """The server block of docs/forward-auth/nginx-single.conf, as documented except for keep-alive:
    `proxy_pass` to the auth server and to the upstream go through `upstream { keepalive }` blocks,
    and the outpost location speaks HTTP/1.1 with `Connection: ""` (the documented app location
    already does). Without this, nginx opens a new connection to mitmdump for every auth
    subrequest, and connection set-up, not the auth check, would be measured."""
    values = {"port": port, "domain": FORWARD_DOMAIN, "outpost_host": HOST, "outpost_port": auth_port,
              "upstream_host": HOST, "upstream_port": upstream_port}
    text = FORWARD_TEMPLATE.read_text()
    unknown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text)) - values.keys()
    if unknown:
        sys.exit(f"{FORWARD_TEMPLATE}: no value for {sorted(unknown)}; update forward_auth_servers() in scripts/bench.py")
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), text)
    edits = [  # (documented line, replacement): each must be found exactly once
        (f"proxy_pass              http://{HOST}:{auth_port};",
         'proxy_pass              http://bench_auth;\n'
         '        proxy_http_version      1.1;\n'
         '        proxy_set_header        Connection "";'),
        (f"proxy_pass         http://{HOST}:{upstream_port};", "proxy_pass         http://bench_app;"),
    ]
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"{FORWARD_TEMPLATE}: expected the line {old!r} once, found it {text.count(old)} times; "
                     "update forward_auth_servers() in scripts/bench.py")
        text = text.replace(old, new)
    return (f"    upstream bench_auth {{ server {HOST}:{auth_port}; keepalive {KEEPALIVE}; }}\n"
            f"    upstream bench_app {{ server {HOST}:{upstream_port}; keepalive {KEEPALIVE}; }}\n" + text)


class LoopbackTransport(httpx2.HTTPTransport):
    """Connects to 127.0.0.1 whatever the URL's host, and keeps the URL (so the cookie jar judges
    cookies by the name a browser would use): lets a client sign in at app.example.test:<port>."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        original = request.url
        request.url = original.copy_with(host=HOST)
        try:
            return super().handle_request(request)
        finally:
            request.url = original


# ---------------------------------------------------------------- load tool


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


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
        shown = shlex.join(argv)
        for header in headers:
            if header.startswith("Cookie:"):
                shown = shown.replace(header, "Cookie: <session>")
            elif header.startswith("Authorization: Bearer "):
                shown = shown.replace(header, "Authorization: Bearer <JWT>")
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
        non_200 = re.search(r"^Non-200 responses: ([1-9]\d*)$", out, re.M)
        if non_200:
            errors = "; ".join(filter(None, [errors, f"{non_200.group(1)} answers not 200"]))
        count = re.search(r"^\s*(\d+) requests in", out, re.M)
        return Result("", "", rps, parse_ms(pct["50"]) if "50" in pct else None,
                      parse_ms(pct["99"]) if "99" in pct else None, errors,
                      requests=int(count.group(1)) if count else None)

    @staticmethod
    def _parse_h2load(out: str) -> Result:
        rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
        counts = re.findall(r"(\d+) (failed|errored|timeout|3xx|4xx|5xx)\b", out)  # h2load counts 3xx too
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", out)
        return Result("", "", rps, None, None, ", ".join(f"{n} {what}" for n, what in counts if int(n)),
                      requests=int(done.group(1)) if done else None)


# ---------------------------------------------------------------- outpost and login

OUTPOST_CONFIG = """\
outpost:
  name: mitm-outpost bench
providers:
{providers}"""

OUTPOST_PROVIDER = """\
  - name: {name}
    mode: proxy
    external_host: http://{hostname}:{port}
    internal_host: http://{host}:{upstream}
    issuer: http://{host}:{idp}
    client_id: {name}-client
    client_secret: bench-secret
    access_token_validity: 3600
{extra}"""

OUTPOST_DOMAIN = "outpost.test"  # the providers are <x>.outpost.test:<port>; every name is 127.0.0.1 here

SKIP_PATH = "/public/"  # the one rule of the signed-in outpost: ^/public/ (never the benchmarked /bench)
SKIP_RULES = 100  # the many-rules outpost: ^/public/section-<i>/ for i < SKIP_RULES, none matching /bench


def skip_rules_yaml(count: int) -> str:
    """`skip_path_regex` with `count` distinct anchored rules, none of which matches /bench."""
    if count == 1:
        return f'    skip_path_regex: "^{SKIP_PATH}"\n'
    return "    skip_path_regex: |\n" + "".join(f"      ^{SKIP_PATH}section-{i}/\n" for i in range(count))


def skip_rule_cost() -> list[str]:
    """The rules alone, in this process: Provider.is_skipped with the bench's 1 rule and its
    SKIP_RULES rules (one RE2 program each), on the paths a request of each kind tests. Timed
    in-process because a few hundred ns hide in the ±20 % of any req/s figure here."""
    import timeit

    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost.provider import compile_skip_rules

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


def skipped_path(count: int) -> str:
    """A path the last of `count` rules lets through without identity (proves the rules were loaded)."""
    return f"{SKIP_PATH}x" if count == 1 else f"{SKIP_PATH}section-{count - 1}/x"


OUTPOST_FORWARD_CONFIG = """\
outpost:
  name: mitm-outpost bench forward auth
providers:
  - name: bench-forward
    mode: forward_single
    external_host: http://app.{domain}:{port}
    issuer: http://{host}:{idp}
    client_id: bench-forward-client
    client_secret: bench-secret
    access_token_validity: 3600
"""


def follow(response: httpx2.Response, expect: str) -> str:
    """The absolute Location of a login step's answer, which must be a 302 to a URL containing `expect`."""
    location = urllib.parse.urljoin(str(response.url), response.headers.get("location", ""))
    if response.status_code != 302 or expect not in location:
        sys.exit(f"login: {response.request.method} {response.url} answered {response.status_code} "
                 f"-> {location!r}, expected a 302 to ...{expect}...\n{response.text[:500]}")
    return location


def log_in(origin: str, transport: httpx2.BaseTransport | None = None) -> str:
    """Sign in as alice like a browser would and return the `Cookie:` value of the session.

    protected URL -> 302 /outpost.goauthentik.io/start -> 302 IdP authorize -> POST sub=alice
    -> 302 our callback -> 302 back to the protected URL.
    """
    with httpx2.Client(follow_redirects=False, timeout=10, transport=transport) as browser:
        html = {"Accept": "text/html"}
        start = follow(browser.get(origin + "/bench", headers=html), "/outpost.goauthentik.io/start")
        authorize = follow(browser.get(start, headers=html), "/authorize")
        callback = follow(browser.post(authorize, data={"sub": USER}, headers=html), "/outpost.goauthentik.io/callback")
        follow(browser.get(callback, headers=html), origin + "/bench")
        cookies = [f"{c.name}={c.value}" for c in browser.cookies.jar if SESSION_COOKIE.match(c.name)]
    if len(cookies) != 1:
        sys.exit(f"login: expected one session cookie authentik_proxy_<8hex>, got {cookies}")
    return cookies[0]


def id_token(idp: str, client_id: str, client_secret: str = "bench-secret") -> str:
    """An ID token for alice issued by the dev IdP to `client_id`, got by an authorization-code flow by
    hand: POST sub=alice to the authorize endpoint -> 302 redirect_uri?code= -> token endpoint."""
    redirect_uri = "http://127.0.0.1:9/bench-callback"  # never followed
    with httpx2.Client(follow_redirects=False, timeout=10) as client:
        meta = client.get(idp + "/.well-known/openid-configuration").json()
        query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                 "scope": "openid profile email", "state": "bench", "nonce": "bench"}
        r = client.post(meta["authorization_endpoint"], params=query, data={"sub": USER})
        location = r.headers.get("location", "")
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("code", [""])[0]
        if r.status_code != 302 or not location.startswith(redirect_uri) or not code:
            sys.exit(f"id token: authorize answered {r.status_code} -> {location!r}, expected a 302 to "
                     f"{redirect_uri}?code=...\n{r.text[:500]}")
        r = client.post(meta["token_endpoint"], auth=(client_id, client_secret),
                        data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})
        token = r.json().get("id_token") if r.status_code == 200 else None
        if not token:
            sys.exit(f"id token: token endpoint answered {r.status_code}: {r.text[:500]}")
    return token


def check_proxied(url: str, headers: tuple[str, ...] | list[str], user: str = USER) -> None:
    """One request with exactly the load tool's headers (the session cookie, Host) must reach the
    upstream as `user` (not a login redirect)."""
    r = httpx2.get(url, headers=[tuple(h.split(": ", 1)) for h in headers], timeout=10)
    if r.status_code != 200 or r.text.strip() != f"hello {user}".strip():
        sys.exit(f"session check: {url} {list(headers)} answered {r.status_code} {r.headers.get('location', '')} "
                 f"{r.text[:200]!r}, expected 200 'hello {user}' from the upstream")


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


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


class Ratio(NamedTuple):
    """A row of the ratio table: req/s of setup `num` over setup `den` (keys of the rounds), printed when
    both were measured; `target` (and the stretch `goal`) marked ✓ or ✗, or none ("–")."""
    label: str
    num: str
    den: str
    target: float | None = None
    goal: float | None = None


# The ratios printed after the hand-made rows of report(); a new setup's ratio is one line here.
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


def ratio_line(ratio: Ratio, rounds: dict[str, list[Result]], results: dict[str, Result]) -> str:
    """`| label | median ratio | per round | target |`: the ratio of the medians, then round by round."""
    value = results[ratio.num].rps / results[ratio.den].rps
    per = ", ".join(f"{a.rps / b.rps:.2f}" for a, b in zip(rounds[ratio.num], rounds[ratio.den]))
    if ratio.target is None:
        mark = "–"
    else:
        mark = f">= {ratio.target:.1f}" + (f" (goal >= {ratio.goal:.1f})" if ratio.goal else "") + " " + (
            "✓✓" if ratio.goal and value >= ratio.goal else "✓" if value >= ratio.target else "✗ missed")
    return f"| {ratio.label} | {value:.2f} | {per} | {mark} |"


def report(rounds: dict[str, list[Result]], info: dict[str, str], short: bool = False) -> None:
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
    if any(key.startswith("fwd_") for key in results):
        print("\nForward-auth rows: req/s through nginx, proxy CPU = the auth server's (outpost, bare mitmdump or "
              "Apache), not nginx's.")
    if "apache" in results or "fwd_apache" in results:
        print("Apache rows: proxy CPU = Apache's master and its child processes (the event MPM serves from the children).")
    ratio = outpost.rps / bare.rps
    per_round = ", ".join(f"{o.rps / b.rps:.2f}" for o, b in zip(rounds["outpost"], rounds["bare"]))
    print("\n| ratio (req/s) | value | per round | target |")
    print("|---|---:|---|---|")
    print(f"| outpost / bare mitmdump | {ratio:.2f} | {per_round} | >= 0.90 {'✓' if ratio >= 0.9 else '✗'} |")
    if "outpost_skip" in results:
        skip = results["outpost_skip"].rps / outpost.rps
        per_round = ", ".join(f"{m.rps / o.rps:.2f}" for m, o in zip(rounds["outpost_skip"], rounds["outpost"]))
        print(f"| outpost: {SKIP_RULES} skip rules / 1 rule | {skip:.2f} | {per_round} "
              f"| >= 0.95 {'✓' if skip >= 0.95 else '✗'} |")
    if "outpost_header" in results:
        header = results["outpost_header"].rps / outpost.rps
        per_round = ", ".join(f"{h.rps / o.rps:.2f}" for h, o in zip(rounds["outpost_header"], rounds["outpost"]))
        print(f"| outpost: header auth (warm cache) / signed-in cookie | {header:.2f} | {per_round} | – |")
    if "fwd_outpost" in results:
        fwd = results["fwd_outpost"].rps / results["fwd_bare"].rps
        per_round = ", ".join(f"{o.rps / b.rps:.2f}" for o, b in zip(rounds["fwd_outpost"], rounds["fwd_bare"]))
        mark = "✓✓" if fwd >= 2.0 else "✓" if fwd >= 1.0 else "✗"
        print(f"| nginx auth_request: outpost / bare mitmdump | {fwd:.2f} | {per_round} "
              f"| >= 1.0 (goal >= 2.0) {mark} |")
    for ratio in RATIOS:
        if ratio.num in results and ratio.den in results:
            print(ratio_line(ratio, rounds, results))
    if (check := results.get("fwd_lean")) and check.cpu:
        per_check = [1e6 * r.cpu / r.rps for r in rounds["fwd_lean"] if r.cpu]
        us = 1e6 * check.cpu / check.rps
        print(f"| outpost CPU per forward-auth check, one process (fast lane) | {us:.0f} µs "
              f"| {', '.join(f'{c:.0f}' for c in per_check)} | <= 150 µs {'✓' if us <= 150 else '✗ missed'} |")
    print(f"| bare mitmdump / direct | {bare.rps / direct.rps:.4f} | | – |")
    print(f"| outpost / direct | {outpost.rps / direct.rps:.4f} | | – |")
    if "lean" in results:
        print(f"| lean runner, signed in / nginx direct | {results['lean'].rps / direct.rps:.4f} | | – |")
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


# ---------------------------------------------------------------- memory, Redis, replicas, soak


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


MIB = 1024 * 1024


def typical_sessions(n: int):  # type: ignore[no-untyped-def]
    """`n` sessions as identity.build_session makes them at login for a typical user: authentik-like
    claims (64-hex sub, username, email, name, 2 groups, sid), legacy headers on (the default), and a
    distinct ~900-byte JWT per session used as X-authentik-jwt and kept as the id_token (the same string,
    as when the access token is not a JWT). Yields (cookie value, Session)."""
    import secrets
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost import identity, sessions

    provider = SimpleNamespace(name="bench", basic_auth=None, session_lifetime=86400)
    for i in range(n):
        sub = secrets.token_hex(32)
        claims = {"sub": sub, "preferred_username": f"user{i:06d}", "email": f"user{i:06d}@example.com",
                  "name": f"User Number {i}", "groups": ["staff", "engineering"], "sid": secrets.token_hex(16),
                  "iss": "https://auth.example.com/application/o/bench/", "aud": "bench-client", "exp": 0}
        jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJlbmNoIiwidHlwIjoiSldUIn0." + secrets.token_urlsafe(480) + "." + secrets.token_urlsafe(150)
        yield sessions.new_id(), identity.build_session(provider, claims, jwt, jwt, True)  # type: ignore[arg-type]


def memory_probe(mode: str, n: int) -> None:
    """Run in a fresh process (`--memory-probe rss|tracemalloc:N`): put `n` typical sessions in a
    MemoryStore and print the growth as JSON. `rss`: VmRSS before/after (includes allocator slack and
    the interpreter's pools); `tracemalloc`: bytes Python allocated and still holds."""
    import json
    import tracemalloc

    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost.sessions import MemoryStore

    store = MemoryStore()
    made = list(typical_sessions(1))  # imports and first-use caches before the baseline
    asyncio.run(store.put(*made[0]))
    import gc
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
                      "header_bytes": header_bytes, "headers": len(sample.headers), "jwt_bytes": len(sample.id_token_hint)}))


def session_memory(n: int, modes: tuple[str, ...] = ("rss", "tracemalloc")) -> dict[str, dict]:
    return {mode: fresh_process_json("--memory-probe", f"{mode}:{n}", f"memory probe {mode}") for mode in modes}


def start_redis(procs: Processes, tmp: Path, name: str = "redis") -> tuple[int, str] | None:
    server = shutil.which("redis-server") or shutil.which("valkey-server")
    if not server:
        return None
    port = free_port()
    (tmp / name).mkdir()
    proc = procs.start(name, [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                              "--dir", str(tmp / name)])
    import redis as redis_sync
    client = redis_sync.Redis(host=HOST, port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis_sync.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"redis-server did not start:\n{procs.log_tail(name)}")
            time.sleep(0.1)
    version = client.info("server")["redis_version"]
    return port, f"{Path(server).name} {version}"


def redis_client(port: int):  # type: ignore[no-untyped-def]
    import redis as redis_sync
    return redis_sync.Redis(host=HOST, port=port)


def redis_memory(port: int, n: int) -> dict[str, float]:
    """used_memory before/after RedisStore.put of `n` typical sessions (each: the session key, its
    user index and its IdP-session index, all with an expiry), on db 1, then flushed."""
    client = redis_client(port)
    client.flushall()
    before = client.info("memory")["used_memory"]
    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost.redis_store import RedisStore, encode

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
    import redis as redis_sync
    keys = redis_sync.Redis(host=HOST, port=port, db=1).dbsize()
    client.flushall()
    return {"before": before, "after": after, "keys": keys, "value_bytes": sample_len, "seconds": took}


def command_calls(port: int) -> dict[str, int]:
    stats = redis_client(port).info("commandstats")
    return {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}


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


def replicas(args: argparse.Namespace, load: Load, procs: Processes, tmp: Path, nginx: str, confdir: str,
             up_port: int, idp_port: int, redis_port: int) -> list[str]:
    """Two lean runners sharing Redis behind one nginx (`upstream { server a; server b; keepalive }`),
    against one of them alone behind the same nginx; Redis commands per request with a warm cache."""
    a, b, pair_front, one_front = (free_port() for _ in range(4))
    store = f"  session_store: redis://{HOST}:{redis_port}/0\n"
    # Same configuration on both replicas: provider `pair` is reached through nginx's pair_front
    # (both replicas), provider `one` through one_front (replica a only).
    pids = []
    for name, port in (("replica-a", a), ("replica-b", b)):
        config = tmp / f"{name}.yaml"
        config.write_text(
            OUTPOST_CONFIG.replace("outpost:\n", "outpost:\n" + store, 1).format(providers="".join(
                OUTPOST_PROVIDER.format(name=p, hostname=f"{p}.{OUTPOST_DOMAIN}", host=HOST, port=front,
                                        upstream=up_port, idp=idp_port, extra=skip_rules_yaml(1))
                for p, front in (("pair", pair_front), ("one", one_front)))))
        argv = outpost_argv("lean", confdir, config, port, ACCESS_LOG_OFF)
        proc = procs.start(name, argv, LEAN_ENV)
        wait_http(f"http://{HOST}:{port}/outpost.goauthentik.io/ping", procs, proc, expect=204)
        pids.append(proc.pid)
    proc, nginx_argv = start_nginx(procs, tmp, "nginx-replicas", nginx, REPLICA_SERVERS.format(
        host=HOST, a=a, b=b, pair_front=pair_front, one_front=one_front, keepalive=KEEPALIVE))
    wait_http(f"http://{HOST}:{pair_front}/outpost.goauthentik.io/ping", procs, proc, expect=204)
    lines = []
    results = {}
    for key, front, label in (("one", one_front, "1 lean runner (Redis) behind nginx"),
                              ("pair", pair_front, "2 lean runners (shared Redis) behind nginx")):
        host = f"Host: {key}.{OUTPOST_DOMAIN}:{front}"
        cookie = log_in(f"http://{key}.{OUTPOST_DOMAIN}:{front}", LoopbackTransport())
        headers = [f"Cookie: {cookie}", host]
        for _ in range(4):  # both replicas answer (and cache the session)
            check_proxied(f"http://{HOST}:{front}/bench", headers)
        url = f"http://{HOST}:{front}/bench"
        runs = []
        for n in range(args.rounds):
            load.run(label, url, args.warmup, headers, 0, None) if args.warmup else None
            calls0, t0 = command_calls(redis_port), time.monotonic()
            cpu0 = sum(cpu_seconds(p) for p in pids)
            r = load.run(label, url, args.duration, headers, 0, None, tmp / "non200.lua")
            seconds = time.monotonic() - t0
            r.cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / seconds
            calls1 = command_calls(redis_port)
            diff = {k: calls1.get(k, 0) - calls0.get(k, 0) for k in calls1}
            # PING (health check, 1/s per replica) and SUBSCRIBE are the replicas' background; INFO,
            # HELLO and CLIENT are this bench's own connection asking for the stats.
            own = ("ping", "subscribe", "info", "hello", "client|setinfo", "client")
            background = {k: v for k, v in diff.items() if k in own and v}
            hot = {k: v for k, v in diff.items() if k not in own and v}
            runs.append((r, hot, background, seconds))
            print(f"  {label}, round {n + 1}: {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}, "
                  f"Redis commands besides PING/SUBSCRIBE/INFO: {hot or 'none'}{', ' + r.errors if r.errors else ''}", flush=True)
            if "not 200" in r.errors:
                sys.exit(f"{label}: {r.errors}: the session stopped working")
        results[key] = runs
    lines.append("| setup | req/s | p99 | CPU of the replicas (s/s) | Redis commands / request (besides PING, SUBSCRIBE and the bench's INFO) | background and bench commands during the run |")
    lines.append("|---|---:|---:|---:|---|---|")
    med = {}
    for key, label in (("one", "1 lean runner (Redis) behind nginx"), ("pair", "2 lean runners (shared Redis) behind nginx")):
        r, hot, background, seconds = sorted(results[key], key=lambda x: x[0].rps)[(len(results[key]) - 1) // 2]
        med[key] = r
        total = sum(hot.values())
        per = f"{total / r.requests:.5f} ({total} in {r.requests:,} requests: " + \
              (", ".join(f"{k} {v}" for k, v in sorted(hot.items())) or "none") + ")" if r.requests else "–"
        bg = ", ".join(f"{k} {v}" for k, v in sorted(background.items())) or "none"
        lines.append(f"| {label} | {r.rps:,.0f} | {fmt(r.p99_ms, '.2f', ' ms')} | {fmt(r.cpu, '.2f')} | {per} | {bg} in {seconds:.1f} s |")
    per_round = ", ".join(f"{p[0].rps / o[0].rps:.2f}" for p, o in zip(results["pair"], results["one"]))
    lines.append("")
    lines.append(f"2 replicas / 1 replica: {med['pair'].rps / med['one'].rps:.2f} (per round {per_round}); nproc "
                 f"{len(os.sched_getaffinity(0))}, shared by nginx, wrk, Redis and the replicas (reported, not tuned).")
    lines.append(f"nginx: `{shlex.join(nginx_argv)}` with `upstream {{ server a; server b; keepalive {KEEPALIVE}; }}`; "
                 f"replicas: `PYTHONPATH=addons {shlex.join(outpost_argv('lean', confdir, Path('<replica>.yaml'), 0, ACCESS_LOG_OFF))}` "
                 f"(ports per replica), `outpost: {{session_store: redis://{HOST}:<port>/0}}`.")
    return lines


def soak(args: argparse.Namespace, load: Load, setup: Setup, capacity: float, procs: Processes) -> list[str]:
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
    print(f"soak: {args.soak:g} min at {rate * clients:,} req/s (~80 % of {capacity:,.0f}) on {setup.label}", flush=True)
    samples = [(0, rss_bytes(setup.pid))]  # type: ignore[arg-type]
    t0 = time.monotonic()
    with open(procs.logdir / "soak.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            time.sleep(min(10, max(0.1, 10 - (time.monotonic() - t0) % 10)))
            if proc.poll() is None:
                samples.append((round(time.monotonic() - t0), rss_bytes(setup.pid)))  # type: ignore[arg-type]
                print(f"  {samples[-1][0]:>5} s  RSS {samples[-1][1] / MIB:.1f} MiB", flush=True)
    out = (procs.logdir / "soak.log").read_text()
    done = Load._parse_h2load(out) if "req/s" in out else None
    samples.append((round(time.monotonic() - t0), rss_bytes(setup.pid)))  # type: ignore[arg-type]
    rss = [r for _, r in samples]
    shown = shlex.join(argv).replace(next((x for x in setup.headers if x.startswith("Cookie:")), "\0"), "Cookie: <session>")
    return [
        f"Soak, {args.soak:g} min: `{shown}`",
        f"achieved {done.rps:,.0f} req/s, {done.requests or 0:,} requests, {done.errors or 'no errors'}" if done else "h2load output not parsed",
        "RSS series (s: MiB): " + ", ".join(f"{t}: {r / MIB:.1f}" for t, r in samples),
        f"RSS first {rss[0] / MIB:.1f} MiB, last {rss[-1] / MIB:.1f} MiB, max {max(rss) / MIB:.1f} MiB "
        f"(last - first: {(rss[-1] - rss[0]) / MIB:+.1f} MiB)",
    ]


def summarize_profile(path: Path, requests: int, ours: str = "mitm_outpost") -> list[str]:
    """From py-spy's raw (collapsed) stacks: CPU time per request by self time of each function (line
    numbers dropped), split into our code (addons/mitm_outpost), mitmproxy and the rest; and the
    inclusive time of our hooks (stacks through one of our functions, the runner's main() aside)."""
    from collections import Counter
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    in_ours = 0
    total = 0
    def is_ours(frame: str) -> bool:
        return f"{ours}/" in frame and f"{ours}/__main__.py" not in frame
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_time[frames[-1]] += n
        mine = {f for f in frames if is_ours(f)}
        for f in mine:
            incl[f] += n
        in_ours += n if mine else 0
    rate = 250  # --rate of profile()
    def us(samples: int) -> float:
        return samples / rate / requests * 1e6
    def area(frame: str) -> str:
        return "ours" if f"{ours}/" in frame else "mitmproxy" if "mitmproxy/" in frame else "other"
    by_area: Counter[str] = Counter()
    for f, n in self_time.items():
        by_area[area(f)] += n
    lines = [f"py-spy, {total} samples at {rate}/s over {requests:,} requests: {us(total):.0f} µs of CPU per request; "
             f"self time: ours {us(by_area['ours']):.0f} µs, mitmproxy {us(by_area['mitmproxy']):.0f} µs, "
             f"other (asyncio, stdlib...) {us(by_area['other']):.0f} µs; inside our hooks, inclusive of what they call: "
             f"{us(in_ours):.0f} µs",
             "", "| top self time (function) | area | µs / request |", "|---|---|---:|"]
    for f, n in self_time.most_common(15):
        lines.append(f"| `{f}` | {area(f)} | {us(n):.1f} |")
    lines += ["", "| our functions, inclusive | µs / request |", "|---|---:|"]
    for f, n in incl.most_common(12):
        lines.append(f"| `{f}` | {us(n):.1f} |")
    return lines


# ---------------------------------------------------------------- issue 14: /start, sign-out, reload

START_PATH = "/outpost.goauthentik.io/start"
PING_PATH = "/outpost.goauthentik.io/ping"
PROBE_RATE = 50  # signed-in requests per second next to a flood: one user, not one more flood connection
RELOAD_WINDOW = 3  # seconds of /ping after SIGHUP (and 1 s before it, --quick 0.5 s)
SIGNOUT_RATE = 100  # sign-outs per second in the storm, for 3 s (--quick 2 s)


def met(ok: bool) -> str:
    return "✓" if ok else "✗ missed"


def check_redirect(url: str, headers: tuple[str, ...], expect: str) -> None:
    """One request with the load tool's headers must answer 302 to a location containing `expect`:
    the flood rows measure that answer, not an error page."""
    r = httpx2.get(url, headers=[tuple(h.split(": ", 1)) for h in headers], timeout=10)
    if r.status_code != 302 or expect not in r.headers.get("location", ""):
        sys.exit(f"{url} {list(headers)} answered {r.status_code} {r.headers.get('location', '')!r}, "
                 f"expected a 302 to ...{expect}...")


def start_login_setups(procs: Processes, tmp: Path, mitmdump: str, confdir: str, up_port: int,
                       idp_port: int) -> tuple[dict[str, Setup], Setup]:
    """A lean runner of its own (every /start stores a pending login, which the signed-in rows' process
    must not carry) with the two flood rows, both without cookies: /start, and a protected path without
    a session (302 to /start, neither the IdP nor the store asked). Also the signed-in probe's Setup."""
    proc, argv, port = start_outpost(procs, tmp, mitmdump, confdir, up_port, idp_port, {"bench": (1, "")},
                                     runner="lean", name="lean_login", extra=ACCESS_LOG_OFF)
    origin = f"http://{HOST}:{port}"
    wait_http(origin + PING_PATH, procs, proc, expect=204)
    host = (f"Host: bench.{OUTPOST_DOMAIN}:{port}",)
    check_redirect(origin + START_PATH, host, "/authorize")
    check_redirect(origin + "/bench", host, START_PATH)
    cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
    probe = Setup("lean runner, signed in (probe)", origin + "/bench", argv, proc.pid, (f"Cookie: {cookie}", *host))
    check_proxied(probe.url, probe.headers)
    print(f"lean runner for /start: {START_PATH} answers 302 to the IdP, /bench without a session 302 to "
          f"{START_PATH}; signed in as {USER} for the probe", flush=True)
    return {"lean_start": Setup("lean runner, /start (no cookie)", origin + START_PATH, argv, proc.pid, host,
                                count_non_200=False),
            "lean_redirect": Setup("lean runner, no session: 302 to /start", origin + "/bench", argv, proc.pid, host,
                                   count_non_200=False)}, probe


def probe_p99(probe: Setup, seconds: int, load: Load | None = None, flood: Setup | None = None) -> tuple[float, int]:
    """The signed-in probe's p99 (ms) and request count over `seconds`, alone or while wrk floods
    `flood`: wrk runs a second longer, the probe starts half a second in, so every probe request
    meets the flood."""
    from concurrent.futures import ThreadPoolExecutor

    def measure() -> tuple[list[float], list[str]]:
        if flood:
            time.sleep(0.5)
        return bench_state.timed_requests(probe.url, list(probe.headers), seconds, PROBE_RATE, 200, f"hello {USER}")

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(measure)
        if flood and load:
            r = load.run(flood.label, flood.url, seconds + 1, list(flood.headers), 0, None)
            errors = [e for e in r.errors.split(", ") if e and not e.endswith(" 3xx")]  # h2load counts the 302s
            if errors:
                sys.exit(f"{flood.label} next to the probe: {r.errors}")
        latencies, wrong = running.result()
    if wrong:
        sys.exit(f"{probe.label}: {len(wrong)} of {len(latencies)} answers not 200 'hello {USER}', e.g. {wrong[0]}")
    return bench_state.percentile(latencies, 99), len(latencies)


def login_flood(args: argparse.Namespace, load: Load, rounds: dict[str, list[Result]], setups: dict[str, Setup],
                probe: Setup) -> list[str]:
    """The /start figures: CPU per request and req/s against the plain redirect from the rounds; the
    probe's p99 alone and next to a /start flood (and next to a plain-redirect flood, which queues
    the probe as much but does no login work), `--rounds` times, measured here."""
    start, plain = median(rounds["lean_start"]), median(rounds["lean_redirect"])
    cpu_ms = [1000 * r.cpu / r.rps for r in rounds["lean_start"] if r.cpu]
    ratios = [s.rps / p.rps for s, p in zip(rounds["lean_start"], rounds["lean_redirect"])]
    p99: dict[str, list[tuple[float, int]]] = {"alone": [], "lean_start": [], "lean_redirect": []}
    for n in range(args.rounds):
        for key in p99:
            print(f"round {n + 1}/{args.rounds}, signed-in probe at {PROBE_RATE}/s "
                  f"{'alone' if key == 'alone' else 'next to ' + setups[key].label}: {args.duration} s", flush=True)
            p99[key].append(probe_p99(probe, args.duration, load, setups.get(key)))
    alone = statistics.median(p for p, _ in p99["alone"])
    lines = ["\n## /start under load, lean runner (issue 14)\n",
             "| measured | figure | per round | target |", "|---|---|---|---|"]
    start_ms = 1000 * start.cpu / start.rps if start.cpu else None
    lines.append(f"| {START_PATH}: CPU per request | {fmt(start_ms, '.2f', ' ms')} ({start.rps:,.0f} req/s at "
                 f"{fmt(start.cpu, '.2f')} CPU s/s) | {', '.join(f'{c:.2f}' for c in cpu_ms)} "
                 f"| <= 1 ms {met(start_ms is not None and start_ms <= 1)} |")
    flood_ratio = start.rps / plain.rps
    lines.append(f"| /start flood / plain-redirect flood, req/s (wrk -c{args.connections}, no cookie) "
                 f"| {flood_ratio:.2f} ({start.rps:,.0f} vs {plain.rps:,.0f} req/s) "
                 f"| {', '.join(f'{r:.2f}' for r in ratios)} | >= 0.5 {met(flood_ratio >= 0.5)} |")
    for key, label, target in (("lean_start", "a /start flood", 3.0),
                               ("lean_redirect", "a plain-redirect flood", None)):
        during = statistics.median(p for p, _ in p99[key])
        per = ", ".join(f"{d / a:.2f}" for (d, _), (a, _) in zip(p99[key], p99["alone"]))
        counts = f"{sum(c for _, c in p99[key]):,} and {sum(c for _, c in p99['alone']):,} requests"
        mark = f"<= {target:.0f} {met(during / alone <= target)}" if target else "– (queueing alone, for comparison)"
        lines.append(f"| signed-in p99 during {label} / without | {during / alone:.2f} "
                     f"({during:.2f} vs {alone:.2f} ms, {counts}) | {per} | {mark} |")
    lines.append(f"\nThe probe: one keep-alive connection sending `GET /bench` with a session cookie at {PROBE_RATE} "
                 f"req/s (one in flight), in this process, {args.duration} s alone and {args.duration} s inside a "
                 f"{args.duration + 1} s wrk flood; p99 by nearest rank, median of rounds. The flood rows' CPU is "
                 f"the runner's (utime + stime) over the requests wrk counted, as in the table above.")
    return lines


def fresh_process_json(flag: str, value: str, what: str) -> dict:
    """Run this script with a hidden probe flag in a fresh process (nothing of the bench's own heap or
    threads in its numbers) and return the JSON of its last line."""
    import json
    done = subprocess.run([sys.executable, __file__, flag, value], capture_output=True, text=True, timeout=1800,
                          cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def signout_probe(spec: str) -> None:
    """Run in a fresh process (`--signout-probe N:SECONDS`): bench_state.signout_probe on the real
    MemoryStore filled with N typical sessions, a storm of SECONDS; prints its result as JSON."""
    import json

    sys.path.insert(0, str(ROOT / "addons"))
    from mitm_outpost.sessions import MemoryStore

    n, seconds = (int(x) for x in spec.split(":"))
    result = asyncio.run(bench_state.signout_probe(MemoryStore(), typical_sessions(n), n, rate=SIGNOUT_RATE,
                                                   seconds=seconds, idle=seconds / 3))
    print(json.dumps(result))


def signout_lines(args: argparse.Namespace) -> list[str]:
    """Sign-out at --signout-sessions sessions: one user's delete_user and the loop stall of a storm."""
    storm = 2 if args.quick else 3  # --quick: within its time budget
    r = fresh_process_json("--signout-probe", f"{args.signout_sessions}:{storm}", "sign-out probe")
    few = bench_state.FEW
    storm_label = f"{r['storm']} sign-outs at {SIGNOUT_RATE}/s for {r['storm_seconds']:g} s"
    if r["storm"] < r["storm_planned"]:
        storm_label += f" (of {r['storm_planned']}: the rest did not fit in the time)"
    descheduled = (f" (the loop's CPU in any tick <= {r['storm_busy_ms']:.2f} ms: descheduled, not busy)"
                   if r["storm_lag_ms"] > 5 >= r["storm_busy_ms"] else "")
    lines = [f"\n## Sign-out at {r['n']:,} sessions (in-process MemoryStore, issue 14)\n"]
    if r["n"] < 1_000_000:
        lines.append(f"--quick: {r['n']:,} sessions, not the target's 1,000,000 (--signout-sessions N).\n")
    lines += ["| measured | figure | target |", "|---|---|---|",
              f"| delete_user of one user with {few} sessions, median of {len(r['delete_ms'])} users spread over the "
              f"fill order | {r['delete_median_ms']:.3f} ms (max {max(r['delete_ms']):.3f} ms) "
              f"| <= 1 ms {met(r['delete_median_ms'] <= 1)} |",
              f"| longest event-loop stall, {storm_label} (1 ms ticker: latest wake-up) | {r['storm_lag_ms']:.2f} ms "
              f"(most CPU in one tick {r['storm_busy_ms']:.2f} ms; longest delete_user {r['storm_longest_ms']:.3f} ms; "
              f"the ticker alone for {r['idle_seconds']:.2g} s: {r['idle_lag_ms']:.2f} ms, "
              f"CPU {r['idle_busy_ms']:.2f} ms) "
              f"| <= 5 ms {met(r['storm_lag_ms'] <= 5)}{descheduled} |",
              "",
              f"The store: `MemoryStore()` in a fresh process, {r['n']:,} typical sessions (as for memory per session; "
              f"every {few} consecutive ones made one user's) through `put()` in {r['fill_seconds']:.0f} s; it held "
              f"{r['count']:,} before the sign-outs and {r['count_after']:,} after. Each timed user's session was "
              f"checked present before `delete_user` and gone after (`get`). A late wake-up with little CPU in its "
              f"tick is the process waiting for a core, not the loop busy (time a hypervisor steals counts as CPU)."]
    return lines


def reload_lines(args: argparse.Namespace, procs: Processes, tmp: Path, mitmdump: str, confdir: str,
                 up_port: int, idp_port: int) -> list[str]:
    """A lean runner with one provider gains a second whose issuer accepts TCP and never answers; SIGHUP;
    /ping from one client back to back for RELOAD_WINDOW s (and before SIGHUP, for comparison), `--rounds`
    times (each SIGHUP starts the reload anew: the one before is still waiting on that issuer)."""
    lead = 0.5 if args.quick else 1.0  # /ping before SIGHUP
    with bench_state.SilentIssuer(HOST) as silent:
        proc, argv, port = start_outpost(procs, tmp, mitmdump, confdir, up_port, idp_port, {"bench": (1, "")},
                                         runner="lean", name="lean_reload", extra=ACCESS_LOG_OFF)
        ping = f"http://{HOST}:{port}{PING_PATH}"
        wait_http(ping, procs, proc, expect=204)
        config = tmp / "lean_reload.yaml"
        config.write_text(config.read_text() + OUTPOST_PROVIDER.format(
            name="silent", hostname=f"silent.{OUTPOST_DOMAIN}", host=HOST, port=port, upstream=up_port,
            idp=silent.port, extra=""))
        runs = []
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds}, reload: /ping {lead:g} s, SIGHUP, /ping {RELOAD_WINDOW} s", flush=True)
            before, wrong = bench_state.timed_requests(ping, [], lead, None, 204)
            os.kill(proc.pid, signal.SIGHUP)
            during, wrong_during = bench_state.timed_requests(ping, [], RELOAD_WINDOW, None, 204)
            if wrong or wrong_during:
                sys.exit(f"/ping during the reload answered {(wrong + wrong_during)[0]}")
            runs.append((before, during, len(silent.held)))
        log = (procs.logdir / "lean_reload.log").read_text(errors="replace")
    procs.stop(proc)  # once the issuer has closed its connections: the runner's exit waits for the reload's thread
    p99 = [bench_state.percentile(d, 99) for _, d, _ in runs]
    worst = max(max(d) for _, d, _ in runs)
    before = [x for b, _, _ in runs for x in b]
    during = [x for _, d, _ in runs for x in d]
    median_p99 = statistics.median(p99)
    return ["\n## /ping during a reload, lean runner (issue 14)\n",
            "| /ping, one client back to back | requests | p50 | p99 | max | per round (p99) | target |",
            "|---|---:|---:|---:|---:|---|---|",
            f"| {lead:g} s before SIGHUP | {len(before):,} | {statistics.median(before):.2f} ms | "
            f"{bench_state.percentile(before, 99):.2f} ms | {max(before):.2f} ms | | – |",
            f"| {RELOAD_WINDOW} s after SIGHUP (a second provider, its issuer never answers) | {len(during):,} "
            f"| {statistics.median(during):.2f} ms | {median_p99:.2f} ms | {worst:.2f} ms "
            f"| {', '.join(f'{p:.2f}' for p in p99)} | p99 <= 50 ms {met(median_p99 <= 50)} |",
            "",
            f"The silent issuer took {runs[-1][2]} connection(s) during the windows (connections after each round: "
            f"{', '.join(str(c) for _, _, c in runs)}) and answered none; SIGHUP logged "
            f"{log.count('SIGHUP: reloading')} time(s). p99 after SIGHUP: median of rounds; max: over all rounds."]


# ---------------------------------------------------------------- main


def profile(args: argparse.Namespace, procs: Processes, pid: int, seconds: int) -> subprocess.Popen:
    """py-spy samples the process under test (the outpost by default, see --profile-setup) for one
    warm-up and measurement, without pausing it (--nonblocking), so it costs that process little;
    that round's numbers are still a bit lower."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not spy:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    fmt = {".svg": "flamegraph", ".txt": "raw"}.get(Path(args.profile).suffix, "speedscope")
    return procs.start("py-spy", [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "250", "--duration",
                                  str(seconds), "--format", fmt, "-o", str(Path(args.profile).resolve())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument("--load-tool", choices=["auto", "wrk", "h2load"], default="auto", help="default: wrk if installed")
    parser.add_argument("--profile", metavar="FILE", help="record the outpost (see --profile-setup) under load "
                        "(first round) with py-spy "
                        "(.venv/bin/pip install py-spy) into FILE: .svg flame graph, .txt collapsed stacks, else speedscope JSON")
    parser.add_argument("--profile-setup", choices=["outpost", "outpost_skip", "outpost_header", "fwd_outpost", "bare",
                                                    "fwd_bare", "lean", "lean_skip", "lean_log", "fwd_lean",
                                                    "lean_start", "lean_redirect"], default="outpost",
                        help="which process --profile records: the outpost in proxy mode (default), the outpost "
                        "behind nginx auth_request, the outpost with 100 skip rules or with header auth, or the bare mitmdump of "
                        "either mode, for comparison")
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
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
        return
    if args.memory_probe:
        mode, n = args.memory_probe.split(":")
        memory_probe(mode, int(n))
        return
    if args.signout_probe:
        signout_probe(args.signout_probe)
        return
    quick = (2, 1) if args.quick else (10, 3)
    args.duration = quick[0] if args.duration is None else args.duration
    args.warmup = quick[1] if args.warmup is None else args.warmup
    args.rounds = (1 if args.quick else 3) if args.rounds is None else args.rounds
    args.slices = (1 if args.quick else 5) if args.slices is None else args.slices
    if args.only and args.soak and "lean" not in args.only.split(","):
        parser.error("--soak measures the lean runner: add lean to --only")
    if args.duration % args.slices:
        parser.error(f"--duration {args.duration} is not a whole number of seconds per slice (--slices {args.slices})")
    args.sessions = (10_000 if args.quick else 100_000) if args.sessions is None else args.sessions
    if args.signout_sessions is None:
        args.signout_sessions = 100_000 if args.quick else 1_000_000
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
    via: list[str] | None = None  # forward auth: the command of the nginx in front
    count_non_200: bool = True  # with wrk: count answers that are not 200 (NON_200_SCRIPT)


def addons_mtime() -> float:
    """mitmdump reloads `-s addons/outpost.py` when that file changes, dropping the sessions kept in
    memory: a run during which addons/ changed mixes versions (or measures login redirects)."""
    return max((f.stat().st_mtime for f in (ROOT / "addons").rglob("*.py")), default=0.0)


# The outpost's metrics listener (authentik's 9300, on every interface by default) is off: several
# outposts run at once here, and nothing of the bench listens beyond loopback.
NO_METRICS = ("--set", "metrics_port=0")


# The production runner (README "Running in production"): the same --set options on a lean Master.
# PYTHONPATH=addons so that it runs this checkout's code whether or not the editable install exists.
LEAN_ENV = {"PYTHONPATH": str(ROOT / "addons")}
ACCESS_LOG_OFF = ("--set", "outpost_access_log=off")


def outpost_argv(runner: str, confdir: str, config: Path, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`mitmdump -q -s addons/outpost.py` (runner "mitmdump") or `python -m mitm_outpost` ("lean"),
    with the same --set options."""
    head = ([str(VENV_BIN / "mitmdump"), "-q", "-s", "addons/outpost.py"] if runner == "mitmdump"
            else [sys.executable, "-m", "mitm_outpost"])
    return [*head, "--set", confdir, "--set", f"outpost_config={config}",
            "--set", f"outpost_http_port={port}", "--set", "outpost_https_port=0",
            "--set", f"outpost_listen_host={HOST}", "--set", "listen_port=0", *NO_METRICS, *extra]


def start_outpost(procs: Processes, tmp: Path, mitmdump: str, confdir: str, up_port: int, idp_port: int,
                  providers: dict[str, tuple[int, str]], runner: str = "mitmdump", name: str = "outpost",
                  extra: tuple[str, ...] = (), port: int | None = None, external_port: int | None = None,
                  outpost_yaml: str = "") -> tuple[subprocess.Popen, list[str], int]:
    """One outpost whose proxy providers, {name: (skip rules, more YAML lines)}, are all in front of
    the upstream, at http://<name>.outpost.test:<port> with client `<name>-client` (<port>: the
    outpost's own, or `external_port` when it sits behind nginx)."""
    port = port or free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(OUTPOST_CONFIG.format(providers="".join(
        OUTPOST_PROVIDER.format(name=p, hostname=f"{p}.{OUTPOST_DOMAIN}", host=HOST, port=external_port or port,
                                upstream=up_port, idp=idp_port, extra=skip_rules_yaml(rules) + more)
        for p, (rules, more) in providers.items())).replace("outpost:\n", "outpost:\n" + outpost_yaml, 1))
    argv = outpost_argv(runner, confdir, config, port, extra)
    return procs.start(name, argv, LEAN_ENV if runner == "lean" else None), argv, port


def start_forward_auth(procs: Processes, tmp: Path, nginx: str, mitmdump: str, confdir: str,
                       up_port: int, idp_port: int) -> dict[str, Setup]:
    """nginx (docs/forward-auth/nginx-single.conf + keep-alive) in front of the upstream, three times:
    asking a bare mitmdump that answers 200 to everything, asking the outpost under mitmdump, and
    asking the lean runner (python -m mitm_outpost, access log off), each forward_single and signed in
    through its nginx like a browser at http://app.example.test:<port>."""
    bare_port, bare_front = free_port(), free_port()
    upstream = f"http://{HOST}:{up_port}"

    script = tmp / "bare_auth.py"
    script.write_text(BARE_AUTH_SCRIPT)
    bare_argv = [mitmdump, "-q", "-s", str(script), "--set", confdir, "--listen-host", HOST,
                 "--mode", f"reverse:{upstream}@{bare_port}"]
    bare = procs.start("fwd-bare-mitmdump", bare_argv)
    wait_http(f"http://{HOST}:{bare_port}/", procs, bare)

    auth_servers = {"fwd_bare": (bare_front, bare_port, bare_argv, bare.pid)}
    # trusted_proxies is set explicitly for the lean runner: at the time of writing, `python -m mitm_outpost`
    # does not apply that option's default (127.0.0.0/8), so it answers nginx's checks 403 without it.
    for key, runner, extra in (("fwd_outpost", "mitmdump", ()),
                               ("fwd_lean", "lean", (*ACCESS_LOG_OFF, "--set", "trusted_proxies=127.0.0.0/8"))):
        port, front = free_port(), free_port()
        config = tmp / f"{key}.yaml"
        config.write_text(OUTPOST_FORWARD_CONFIG.format(domain=FORWARD_DOMAIN, port=front, host=HOST, idp=idp_port))
        argv = outpost_argv(runner, confdir, config, port, extra)
        proc = procs.start(key, argv, LEAN_ENV if runner == "lean" else None)
        wait_http(f"http://{HOST}:{port}/outpost.goauthentik.io/ping", procs, proc, expect=204)
        auth_servers[key] = (front, port, argv, proc.pid)

    setups: dict[str, Setup] = {}
    for key, label in (("fwd_bare", "nginx auth_request → bare mitmdump"),
                       ("fwd_outpost", "nginx auth_request → outpost (mitmdump)"),
                       ("fwd_lean", "nginx auth_request → lean runner")):
        front, auth, auth_argv, pid = auth_servers[key]
        proc, nginx_argv = start_nginx(procs, tmp, f"nginx-{key}", nginx, forward_auth_servers(front, auth, up_port))
        # /outpost.goauthentik.io/ goes to the auth server without auth_request: proves nginx -> it.
        ping = f"http://{HOST}:{front}/outpost.goauthentik.io/ping"
        wait_http(ping, procs, proc, expect=200 if key == "fwd_bare" else 204)
        host = f"Host: app.{FORWARD_DOMAIN}:{front}"
        setups[key] = Setup(label, f"http://{HOST}:{front}/bench", auth_argv, pid, (host,), nginx_argv)

    check_proxied(setups["fwd_bare"].url, setups["fwd_bare"].headers, user="")  # 200 'hello ': no identity
    for key in ("fwd_outpost", "fwd_lean"):
        fwd, front = setups[key], auth_servers[key][0]
        cookie = log_in(f"http://app.{FORWARD_DOMAIN}:{front}", LoopbackTransport())
        fwd.headers = (f"Cookie: {cookie}", *fwd.headers)
        check_proxied(fwd.url, fwd.headers)
        print(f"{fwd.label}: signed in as {USER} through nginx at app.{FORWARD_DOMAIN}:{front}, "
              f"upstream answers 'hello {USER}'", flush=True)
    return setups


# ---------------------------------------------------------------- --workers (issue 17)

def wait_workers(url: str, procs: Processes, proc: subprocess.Popen, name: str) -> None:
    """Every worker answers: the supervisor logs "N workers ready" once each has said so."""
    wait_http(url, procs, proc, expect=204)
    deadline = time.monotonic() + 60
    while "workers ready" not in procs.log_tail(name, 200):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{name}: the workers did not all get ready:\n{procs.log_tail(name)}")
        time.sleep(0.2)


def start_worker_setups(procs: Processes, tmp: Path, nginx: str | None, confdir: str, up_port: int,
                        idp_port: int) -> dict[str, Setup]:
    """The production runner with sessions in Redis (which `--workers` needs): proxy mode with
    `--workers 1` and `--workers 2`, and nginx auth_request to `--workers auto`, each signed in."""
    redis = start_redis(procs, tmp, "redis-workers")
    if redis is None:
        print("redis-server not installed: no --workers rows", flush=True)
        return {}
    store = f"  session_store: redis://{HOST}:{redis[0]}/0\n"
    setups: dict[str, Setup] = {}
    for key, workers in (("lean_w1", "1"), ("lean_w2", "2")):
        proc, argv, port = start_outpost(procs, tmp, "", confdir, up_port, idp_port, {"bench": (1, "")}, runner="lean",
                                         name=key, extra=(*ACCESS_LOG_OFF, "--set", f"outpost_workers={workers}"),
                                         outpost_yaml=store)
        ping = f"http://{HOST}:{port}/outpost.goauthentik.io/ping"
        if workers == "1":
            wait_http(ping, procs, proc, expect=204)
        else:
            wait_workers(ping, procs, proc, key)
        host = f"Host: bench.{OUTPOST_DOMAIN}:{port}"
        cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
        setups[key] = Setup(f"lean runner, Redis, --workers {workers}, signed in", f"http://{HOST}:{port}/bench", argv,
                            proc.pid, (f"Cookie: {cookie}", host))
        check_proxied(setups[key].url, setups[key].headers)
    if nginx:
        port, front = free_port(), free_port()
        config = tmp / "fwd_workers.yaml"
        config.write_text(OUTPOST_FORWARD_CONFIG.format(domain=FORWARD_DOMAIN, port=front, host=HOST, idp=idp_port)
                          .replace("outpost:\n", "outpost:\n" + store, 1))
        argv = outpost_argv("lean", confdir, config, port, (*ACCESS_LOG_OFF, "--set", "trusted_proxies=127.0.0.0/8",
                                                             "--set", "outpost_workers=auto"))
        proc = procs.start("fwd_workers", argv, LEAN_ENV)
        wait_workers(f"http://{HOST}:{port}/outpost.goauthentik.io/ping", procs, proc, "fwd_workers")
        nginx_proc, nginx_argv = start_nginx(procs, tmp, "nginx-fwd_workers", nginx,
                                             forward_auth_servers(front, port, up_port))
        wait_http(f"http://{HOST}:{front}/outpost.goauthentik.io/ping", procs, nginx_proc, expect=204)
        cookie = log_in(f"http://app.{FORWARD_DOMAIN}:{front}", LoopbackTransport())
        setups["fwd_workers"] = Setup("nginx auth_request → lean runner, --workers auto (Redis)",
                                      f"http://{HOST}:{front}/bench", argv, proc.pid,
                                      (f"Cookie: {cookie}", f"Host: app.{FORWARD_DOMAIN}:{front}"), nginx_argv)
        check_proxied(setups["fwd_workers"].url, setups["fwd_workers"].headers)
    for setup in setups.values():
        print(f"{setup.label}: signed in as {USER}, upstream answers 'hello {USER}'", flush=True)
    return setups


# ---------------------------------------------------------------- Apache httpd + mod_auth_openidc (the peer)

# Apache with mod_auth_openidc (Debian: apache2, libapache2-mod-auth-openidc) is what an administrator who
# wants OIDC in front of an app picks today: the bench runs it next to the outpost, at the same dev IdP, in
# front of the same upstream, behind the same nginx for forward auth.
APACHE_MODULE_DIRS = ("/usr/lib/apache2/modules", "/usr/lib64/httpd/modules", "/usr/lib/httpd/modules")
# LoadModule for each one found in the module directory; the others are compiled in (Debian: unixd).
APACHE_MODULES = ("mpm_event", "unixd", "authn_core", "authz_core", "authz_user", "headers", "alias", "rewrite",
                  "proxy", "proxy_http", "auth_openidc")
APACHE_SESSION_COOKIE = "mod_auth_openidc_session"
APACHE_CALLBACK = "/outpost.goauthentik.io/callback"  # OIDCRedirectURI, relative (the request's host), as the outpost's

# Production-like: Debian's mpm_event.conf and apache2.conf values, except MaxKeepAliveRequests (100 there):
# unlimited, as nginx's keepalive_requests and mitmproxy here, so that no row alone reconnects every 100
# requests. No access log (as nginx's access_log off and outpost_access_log=off). The children run as
# nobody, as nginx's workers; ErrorLog to stderr, which Processes keeps in the bench's temp dir.
APACHE_MAIN = """\
# scripts/bench.py: a private Apache in the foreground, its state under {dir}
ServerRoot {dir}
DefaultRuntimeDir {dir}
PidFile {dir}/httpd.pid
ErrorLog /dev/stderr
LogLevel warn
Listen {host}:{port}
ServerName {host}
User nobody
Group nogroup
{modules}
StartServers 2
MinSpareThreads 25
MaxSpareThreads 75
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers 150
MaxConnectionsPerChild 0
Timeout 300
KeepAlive On
KeepAliveTimeout 5
MaxKeepAliveRequests 0

OIDCProviderMetadataURL http://{host}:{idp}/.well-known/openid-configuration
OIDCClientID {client}
OIDCClientSecret bench-secret
OIDCRedirectURI {callback}
OIDCCryptoPassphrase {passphrase}
OIDCScope "openid profile email"
OIDCRemoteUserClaim preferred_username
OIDCSessionType server-cache
OIDCCacheType shm
# the outpost's sessions here last access_token_validity (3600 s); mod_auth_openidc's default is 300 s idle
OIDCSessionInactivityTimeout 3600
OIDCPassClaimsAs headers
{locations}"""

APACHE_PROXY = """\
<Location />
    AuthType openid-connect
    Require valid-user
    # the upstream answers `hello <X-authentik-username>`: the signed-in user, as the outpost sends it
    RequestHeader set X-authentik-username "expr=%{{REMOTE_USER}}"
</Location>
ProxyPass / http://{host}:{upstream}/
"""

# For nginx auth_request with docs/forward-auth/nginx-single.conf unchanged: it asks
# /outpost.goauthentik.io/auth/nginx and copies X-authentik-* of a 2xx answer to the upstream request; a 401
# sends the browser to /outpost.goauthentik.io/start?rd=<URL>. The 200 is an empty file: /dev/null, which
# every child can read (the bench's temp dir is root's alone).
APACHE_FORWARD = """\
# nginx sends them (the request's host and scheme); without this, mod_auth_openidc logs two warnings a request
OIDCXForwardedHeaders X-Forwarded-Host X-Forwarded-Proto
Alias /outpost.goauthentik.io/auth/nginx /dev/null
<Location /outpost.goauthentik.io/auth/nginx>
    AuthType openid-connect
    OIDCUnAuthAction 401
    Require valid-user
    OIDCPassClaimsAs environment
    Header set X-authentik-username "expr=%{{REMOTE_USER}}"
    Header set X-authentik-uid "%{{OIDC_CLAIM_sub}}e"
    Header set X-authentik-email "%{{OIDC_CLAIM_email}}e"
    Header set X-authentik-name "%{{OIDC_CLAIM_name}}e"
    Header set X-authentik-groups "%{{OIDC_CLAIM_groups}}e"
</Location>
# a login, then back to rd, a path of this host only
<Location /outpost.goauthentik.io/start>
    AuthType openid-connect
    Require valid-user
    RewriteEngine On
    RewriteCond "%{{HTTP_HOST}}#%{{QUERY_STRING}}" "^([^#]*)#(?:.*&)?rd=https?://\\1(/[^&]*)"
    RewriteRule ^ %2 [R=302,L,NE,QSD]
</Location>
<Location {callback}>
    AuthType openid-connect
    Require valid-user
</Location>
"""


def find_apache() -> tuple[str, Path] | None:
    """apache2 (Debian) or httpd, and the module directory that holds mod_auth_openidc.so."""
    binary = next(filter(None, (shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
                                for name in ("apache2", "httpd"))), None)
    modules = next((Path(d) for d in APACHE_MODULE_DIRS if (Path(d) / "mod_auth_openidc.so").exists()), None)
    return (binary, modules) if binary and modules else None


def apache_version(apache: str) -> str:
    """`Apache/2.4.x (Debian), mod_auth_openidc <version>` (the module's from dpkg, where there is one)."""
    server = subprocess.run([apache, "-v"], capture_output=True, text=True).stdout
    server = re.search(r"Server version:\s*(.+)", server)
    dpkg = shutil.which("dpkg-query")
    module = subprocess.run([dpkg, "-W", "-f", "${Version}", "libapache2-mod-auth-openidc"], capture_output=True,
                            text=True).stdout.strip() if dpkg else ""
    return f"{server.group(1).strip() if server else 'Apache httpd'}, mod_auth_openidc {module or '(version unknown)'}"


def start_apache(procs: Processes, tmp: Path, name: str, apache: str, modules: Path, port: int, idp_port: int,
                 locations: str) -> tuple[subprocess.Popen, list[str]]:
    """One Apache (`-DFOREGROUND`, event MPM: a master and its child processes) with APACHE_MAIN and the given
    locations, its state under tmp/name, client `<name>-client` at the dev IdP (which takes any client)."""
    d = tmp / name
    d.mkdir()
    loads = "\n".join(f"LoadModule {m}_module {modules / f'mod_{m}.so'}" for m in APACHE_MODULES
                      if (modules / f"mod_{m}.so").exists())
    conf = d / "httpd.conf"
    conf.write_text(APACHE_MAIN.format(dir=d, host=HOST, port=port, modules=loads, idp=idp_port, client=f"{name}-client",
                                       callback=APACHE_CALLBACK, passphrase=secrets.token_urlsafe(32),
                                       locations=locations))
    argv = [apache, "-f", str(conf), "-DFOREGROUND"]
    return procs.start(name, argv), argv


def log_in_apache(origin: str, sign_in: str = "", transport: httpx2.BaseTransport | None = None) -> str:
    """Sign in as alice at Apache's mod_auth_openidc like a browser would and return the `Cookie:` value of
    its session.

    protected URL [-> 302 `sign_in` (nginx's answer to the auth location's 401)] -> 302 IdP authorize, with
    Apache's state cookie -> POST sub=alice -> 302 Apache's redirect URI with code and state -> Apache redeems
    the code, keeps the session in its shm cache, 302 to where the login began [-> 302 rd] -> the protected
    URL answers 'hello alice' (the upstream, as alice).
    """
    with httpx2.Client(follow_redirects=False, timeout=10, transport=transport) as browser:
        html = {"Accept": "text/html"}
        began = origin + "/bench"
        if sign_in:
            began = follow(browser.get(began, headers=html), sign_in)
        authorize = follow(browser.get(began, headers=html), "/authorize")
        if not any(c.name.startswith("mod_auth_openidc_state_") for c in browser.cookies.jar):
            sys.exit(f"login: {began} sent no state cookie mod_auth_openidc_state_<state> with its redirect to the IdP")
        callback = follow(browser.post(authorize, data={"sub": USER}, headers=html), APACHE_CALLBACK)
        back = follow(browser.get(callback, headers=html), began)
        if sign_in:
            back = follow(browser.get(back, headers=html), origin + "/bench")
        r = browser.get(back, headers=html)
        if r.status_code != 200 or r.text.strip() != f"hello {USER}":
            sys.exit(f"login: {back} answered {r.status_code} {r.text[:200]!r} after the login, expected 'hello {USER}'")
        cookies = [f"{c.name}={c.value}" for c in browser.cookies.jar if c.name == APACHE_SESSION_COOKIE]
    if len(cookies) != 1:
        sys.exit(f"login: expected one session cookie {APACHE_SESSION_COOKIE}, got {cookies}")
    return cookies[0]


def start_apache_setups(procs: Processes, tmp: Path, apache: str, modules: Path, nginx: str | None, up_port: int,
                        idp_port: int) -> dict[str, Setup]:
    """Apache + mod_auth_openidc twice, each its own process, signed in at the dev IdP like a browser: in proxy
    mode in front of the upstream (`apache`), and, when nginx is installed, as the auth server of nginx
    auth_request with the nginx config of the outpost's forward-auth rows (`fwd_apache`)."""
    port = free_port()
    proc, argv = start_apache(procs, tmp, "apache", apache, modules, port, idp_port,
                              APACHE_PROXY.format(host=HOST, upstream=up_port))
    origin = f"http://{HOST}:{port}"
    wait_http(origin + "/bench", procs, proc, expect=302)  # no session: to the IdP (metadata fetched by now)
    cookie = log_in_apache(origin)
    setups = {"apache": Setup("Apache mod_auth_openidc, proxy mode (signed in)", origin + "/bench", argv, proc.pid,
                              (f"Cookie: {cookie}",))}
    check_proxied(setups["apache"].url, setups["apache"].headers)
    print(f"Apache proxy mode: signed in as {USER} at the dev IdP, session cookie {APACHE_SESSION_COOKIE}, "
          f"upstream answers 'hello {USER}'", flush=True)
    if not nginx:
        print("nginx not installed: no nginx auth_request → Apache row", flush=True)
        return setups
    port, front = free_port(), free_port()
    proc, argv = start_apache(procs, tmp, "fwd_apache", apache, modules, port, idp_port,
                              APACHE_FORWARD.format(callback=APACHE_CALLBACK))
    wait_http(f"http://{HOST}:{port}/outpost.goauthentik.io/auth/nginx", procs, proc, expect=401)
    nginx_proc, nginx_argv = start_nginx(procs, tmp, "nginx-fwd_apache", nginx, forward_auth_servers(front, port, up_port))
    host = (f"Host: app.{FORWARD_DOMAIN}:{front}",)
    wait_http(f"http://{HOST}:{front}/outpost.goauthentik.io/auth/nginx", procs, nginx_proc, expect=401)  # nginx -> Apache
    check_redirect(f"http://{HOST}:{front}/bench", host, "/outpost.goauthentik.io/start")  # no cookie: 401 -> sign-in
    cookie = log_in_apache(f"http://app.{FORWARD_DOMAIN}:{front}", "/outpost.goauthentik.io/start", LoopbackTransport())
    fwd = Setup("nginx auth_request → Apache mod_auth_openidc", f"http://{HOST}:{front}/bench", argv, proc.pid,
                (f"Cookie: {cookie}", *host), nginx_argv)
    check_proxied(fwd.url, fwd.headers)
    print(f"{fwd.label}: the auth location answers 401 without a session; signed in as {USER} through nginx at "
          f"app.{FORWARD_DOMAIN}:{front}, upstream answers 'hello {USER}'", flush=True)
    setups["fwd_apache"] = fwd
    return setups


def run(args: argparse.Namespace, load: Load, procs: Processes, tmp: Path, loadavg: str) -> None:
    """Start all servers, sign in, then measure direct, bare, outpost (and the two forward-auth
    setups when nginx is installed) in turn, `--rounds` times.
    The servers not under load sit idle in epoll, so they cost the measured one nothing."""
    up_port, bare_port, idp_port = (free_port() for _ in range(3))
    mitmdump = str(VENV_BIN / "mitmdump")
    mtime = addons_mtime()
    confdir = f"confdir={tmp / 'mitm'}"  # a private CA and default cert: nothing lands in ~/.mitmproxy

    upstream_kind, upstream_argv = start_upstream(procs, tmp, up_port)
    upstream = f"http://{HOST}:{up_port}"

    bare_argv = [mitmdump, "-q", "--set", confdir, "--listen-host", HOST, "--mode", f"reverse:{upstream}@{bare_port}"]
    bare = procs.start("bare-mitmdump", bare_argv)
    wait_http(f"http://{HOST}:{bare_port}/", procs, bare)

    idp = procs.start("idp", [str(VENV_BIN / "oidc-provider-mock"), "--port", str(idp_port),
                              "--user-claims-file", "scripts/demo/users.yaml"])
    wait_http(f"http://{HOST}:{idp_port}/.well-known/openid-configuration", procs, idp)
    # One outpost, three providers alike but for: `bench` has 1 skip rule, `skip` SKIP_RULES of them
    # (what a long list of unauthenticated paths costs a request none matches), `header` verifies bearer
    # JWTs locally (header auth, no cookie). One process, the provider picked by Host (one dict lookup,
    # whatever their number): two identical mitmdump processes differ by a few % in req/s, as much as
    # the cost being measured, so separate processes would compare processes, not configurations.
    outpost, outpost_argv, outpost_port = start_outpost(
        procs, tmp, mitmdump, confdir, up_port, idp_port,
        {"bench": (1, ""), "skip": (SKIP_RULES, ""), "header": (1, "    verify_bearer_jwt_locally: true\n")})
    wait_http(f"http://{HOST}:{outpost_port}/outpost.goauthentik.io/ping", procs, outpost, expect=204)
    url = f"http://{HOST}:{outpost_port}/bench"
    setups = {
        "direct": Setup("nginx direct (ceiling)" if find_nginx() else "direct (python upstream, ceiling)",
                        upstream + "/bench", upstream_argv, count_non_200=False),
        "bare": Setup("bare mitmdump -q", f"http://{HOST}:{bare_port}/bench", bare_argv, bare.pid),
    }
    for key, name, label, rules in (("outpost", "bench", "outpost (signed in)", 1),
                                    ("outpost_skip", "skip", f"outpost, {SKIP_RULES} skip rules (signed in)", SKIP_RULES)):
        host = f"Host: {name}.{OUTPOST_DOMAIN}:{outpost_port}"
        # the rules are loaded: a path they match needs no login and gets no identity
        check_proxied(f"http://{HOST}:{outpost_port}{skipped_path(rules)}", [host], user="")
        cookie = log_in(f"http://{name}.{OUTPOST_DOMAIN}:{outpost_port}", LoopbackTransport())  # /bench is not skipped
        check_proxied(url, [f"Cookie: {cookie}", host])
        print(f"{label}: signed in as {USER} at {name}.{OUTPOST_DOMAIN}, session cookie {cookie.split('=')[0]}, "
              f"upstream answers 'hello {USER}'; {skipped_path(rules)} passes without login", flush=True)
        setups[key] = Setup(label, url, outpost_argv, outpost.pid, (f"Cookie: {cookie}", host))
    host = f"Host: header.{OUTPOST_DOMAIN}:{outpost_port}"
    bearer = f"Authorization: Bearer {id_token(f'http://{HOST}:{idp_port}', 'header-client')}"
    check_proxied(url, [bearer, host])  # verifies the JWT and fills the cache the load then hits
    print(f"header auth at header.{OUTPOST_DOMAIN}: an ID token of the IdP for header-client, sent as a bearer "
          f"token without a cookie, upstream answers 'hello {USER}'", flush=True)
    setups["outpost_header"] = Setup("outpost, header auth (warm cache)", url, outpost_argv, outpost.pid, (bearer, host))
    # The lean runner, twice (same config, provider `bench` with its 1 skip rule): access log off, and
    # the default JSON access log (one line per request to stderr, here a file) to show what it costs.
    lean_pids: dict[str, int] = {}
    for key, label, extra in (("lean", "lean runner, signed in", ACCESS_LOG_OFF),
                              ("lean_log", "lean runner, signed in, access log json", ())):
        proc, argv, port = start_outpost(procs, tmp, mitmdump, confdir, up_port, idp_port, {"bench": (1, "")},
                                         runner="lean", name=key, extra=extra)
        wait_http(f"http://{HOST}:{port}/outpost.goauthentik.io/ping", procs, proc, expect=204)
        host = f"Host: bench.{OUTPOST_DOMAIN}:{port}"
        lean_url = f"http://{HOST}:{port}/bench"
        if key == "lean":
            skip_url = f"http://{HOST}:{port}{SKIP_PATH}bench"
            check_proxied(skip_url, [host], user="")
            setups["lean_skip"] = Setup("lean runner, no auth (skip rule)", skip_url, argv, proc.pid, (host,))
        cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
        check_proxied(lean_url, [f"Cookie: {cookie}", host])
        print(f"{label}: signed in as {USER}, upstream answers 'hello {USER}'", flush=True)
        setups[key] = Setup(label, lean_url, argv, proc.pid, (f"Cookie: {cookie}", host))
        lean_pids[key] = proc.pid
    login_setups, probe = start_login_setups(procs, tmp, mitmdump, confdir, up_port, idp_port)
    setups.update(login_setups)
    nginx = find_nginx()
    if nginx:
        setups.update(start_forward_auth(procs, tmp, nginx, mitmdump, confdir, up_port, idp_port))
    else:
        print("nginx not installed: no forward-auth measurement", flush=True)
    setups.update(start_worker_setups(procs, tmp, nginx, confdir, up_port, idp_port))
    apache = find_apache()
    if apache:
        setups.update(start_apache_setups(procs, tmp, *apache, nginx, up_port, idp_port))
    else:
        print("Apache httpd with mod_auth_openidc not installed: no Apache rows "
              "(apt-get install apache2 libapache2-mod-auth-openidc)", flush=True)
    if args.only:
        setups = {key: s for key, s in setups.items() if key in ("direct", "bare", "outpost", *args.only.split(","))}
    non_200 = tmp / "non200.lua"
    non_200.write_text(NON_200_SCRIPT)
    rounds: dict[str, list[Result]] = {key: [] for key in setups}
    slice_seconds = args.duration // args.slices
    for n in range(args.rounds):
        # Each round visits every setup `--slices` times for duration/slices seconds: a neighbour's
        # burst of CPU then hits all setups alike instead of one whole measurement.
        parts: dict[str, list[Result]] = {key: [] for key in setups}
        for k in range(args.slices):
            for key, s in setups.items():
                warmup = args.warmup if k == 0 else 0
                print(f"round {n + 1}/{args.rounds}, slice {k + 1}/{args.slices}, {s.label}: {s.url} "
                      f"({warmup} s warm-up + {slice_seconds} s)", flush=True)
                profiled = args.profile and key == args.profile_setup and n == 0 and k == 0
                spy = profile(args, procs, s.pid, warmup + slice_seconds) if profiled else None  # type: ignore[arg-type]
                r = load.run(s.label, s.url, slice_seconds, list(s.headers), warmup, s.pid,
                             non_200 if s.count_non_200 else None)
                r.server = shlex.join(s.server) if not s.via else f"{shlex.join(s.via)}` asking `{shlex.join(s.server)}"
                parts[key].append(r)
                print(f"  {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}{', ' + r.errors if r.errors else ''}", flush=True)
                if any(h.startswith(("Cookie:", "Authorization:")) for h in s.headers) and "not 200" in r.errors:
                    changed = " addons/ changed during the run (mitmdump reloads addons/outpost.py when it changes, " \
                              "which drops the sessions)." if addons_mtime() != mtime else ""
                    sys.exit(f"{s.label}: {r.errors}: the session (or bearer token) stopped working, so this measured "
                             f"something else (login redirects, 401s?).{changed}")
                if spy:
                    spy.wait(30)
                    print(f"  profile of {s.label} under load: {args.profile}", flush=True)
        for key, results in parts.items():
            rounds[key].append(combine(results, slice_seconds))
    for key in ("outpost", "outpost_skip", "outpost_header", "fwd_outpost", "lean", "lean_log", "fwd_lean",
                "apache", "fwd_apache"):  # still signed in: no number came from login redirects
        if key in setups:
            check_proxied(setups[key].url, setups[key].headers)
    if addons_mtime() != mtime:
        print("\nWARNING: addons/ changed during the run; mitmdump may have reloaded addons/outpost.py, "
              "so the rounds may mix code versions.", flush=True)
    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "load average before the run": loadavg,
        "upstream": upstream_kind,
        "load tool": f"{load.version()}, {args.threads} thread(s), {args.connections} connections, "
                     f"{args.warmup} s warm-up + {args.duration} s per measurement in {args.slices} interleaved slice(s), "
                     f"{args.rounds} round(s), "
                     + ("median shown" if args.rounds != 2 else "the slower of the 2 rounds shown (--quick: 2 rounds)"),
        "mitmproxy": f"{mitmproxy.version.VERSION}, Python {sys.version.split()[0]}",
    }
    info["outpost"] = (f"one process, three proxy providers picked by Host: bench.{OUTPOST_DOMAIN} with 1 skip rule "
                       f"(`^{SKIP_PATH}`), skip.{OUTPOST_DOMAIN} with {SKIP_RULES} (`^{SKIP_PATH}section-<i>/`, "
                       f"i < {SKIP_RULES}; none matches /bench), header.{OUTPOST_DOMAIN} (1 rule, header auth)")
    info["header auth"] = ("provider with `verify_bearer_jwt_locally: true`, `Authorization: Bearer <ID token of the IdP "
                           "for its client>` and no cookie; the warm-up fills the cache (header_auth_cache_ttl default)")
    if any(key.startswith("fwd_") for key in setups):
        info["forward auth"] = (f"nginx (1 worker) with {FORWARD_TEMPLATE.relative_to(ROOT)}, except `upstream {{ keepalive "
                                f"{KEEPALIVE}; }}` to the auth server and to the upstream, HTTP/1.1 and `Connection: \"\"` "
                                f"to the auth server; outpost provider mode forward_single")
    if "apache" in setups or "fwd_apache" in setups:
        binary = apache[0]  # type: ignore[index]
        info["Apache"] = (f"{apache_version(binary)}: `{Path(binary).name} -f <generated conf> -DFOREGROUND` "
                          f"(one process each for proxy mode and for nginx auth_request), event MPM with Debian's "
                          f"defaults (StartServers 2, ThreadsPerChild 25, MaxRequestWorkers 150), KeepAlive On "
                          f"(timeout 5 s), MaxKeepAliveRequests 0 (unlimited, as nginx and mitmproxy here), no access "
                          f"log, LogLevel warn; OIDCSessionType server-cache, OIDCCacheType shm, "
                          f"OIDCSessionInactivityTimeout 3600, OIDCScope \"openid profile email\", session from a "
                          f"login at the same dev IdP. Proxy mode: `Require valid-user` on /, OIDCPassClaimsAs "
                          f"headers, X-authentik-username from REMOTE_USER (preferred_username), `ProxyPass /` to the upstream "
                          f"(mod_proxy_http, reused connections). nginx auth_request: the same nginx config as the "
                          f"outpost's rows, /outpost.goauthentik.io/auth/nginx with OIDCUnAuthAction 401, claims as "
                          f"environment, answered by an empty 200 with X-authentik-username/uid/email/name/groups "
                          f"(the outpost's answer carries more headers, the JWT among them)")
    lean = setups.get("lean")
    info["lean runner"] = (f"`PYTHONPATH=addons python -m mitm_outpost` with the --set options of the mitmdump outpost; "
                           f"provider bench (1 skip rule); `outpost_access_log=off` except the 'access log json' row "
                           f"(default JSON lines to stderr, here a file); metrics_port=0 on every outpost")
    if "lean_start" in setups:
        info["login rows"] = (f"a lean runner of their own (provider bench, access log off), no cookie: {START_PATH}, "
                              f"and /bench without a session (302 to {START_PATH})")
    report(rounds, info, short=args.duration < 5)
    if "lean_start" in setups and "lean_redirect" in setups:
        print("\n".join(login_flood(args, load, rounds, setups, probe)), flush=True)
    print(f"\n## Skip rules alone: RE2 search per request, best of 5 × 200,000 calls\n\n"
          f"A signed-in request in proxy mode never reaches the rules (the session is checked first), so the "
          f"req/s rows above compare equal work; this is what the rules cost where they are tested.\n")
    print("\n".join(skip_rule_cost()), flush=True)
    if lean and "lean_log" in setups:
        print(f"\nLean runner (signed-in row) RSS after the rounds: {rss_bytes(lean.pid) / MIB:.1f} MiB "  # type: ignore[arg-type]
              f"(access-log row: {rss_bytes(setups['lean_log'].pid) / MIB:.1f} MiB)", flush=True)  # type: ignore[arg-type]
    if args.profile:
        prof_key = args.profile_setup
        if Path(args.profile).suffix == ".txt" and rounds[prof_key][0].requests:
            first = rounds[prof_key][0]
            # py-spy covered the warm-up and the first slice: count them at the measured rate
            requests = int(first.rps * (args.warmup + slice_seconds))
            print(f"\n## Profile of {setups[prof_key].label} (first round, warm-up + first slice)\n")
            print("\n".join(summarize_profile(Path(args.profile), requests)))
    t0 = time.monotonic()
    if args.soak and lean:
        print("\n## Soak\n", flush=True)
        print("\n".join(soak(args, load, lean, median(rounds["lean"]).rps, procs)), flush=True)
    if args.no_extras:
        return
    print(f"\n## Memory per session ({args.sessions:,} sessions)\n", flush=True)
    mem = session_memory(args.sessions, ("rss",) if args.quick else ("rss", "tracemalloc"))  # --quick: RSS only
    rss = mem["rss"]
    print("| store | measured | before | after | per session | target |")
    print("|---|---|---:|---:|---:|---|")
    for m, how in ((rss, "VmRSS of a fresh Python process"), (mem.get("tracemalloc"), "tracemalloc (Python allocations still held)")):
        if m is None:
            continue
        per = (m["after"] - m["before"]) / m["n"]
        print(f"| MemoryStore, in-process | {how} | {m['before'] / MIB:.1f} MiB | {m['after'] / MIB:.1f} MiB "
              f"| {per:,.0f} B | <= 2048 B {'✓' if per <= 2048 else '✗ missed'} |")
    redis_info = start_redis(procs, tmp)
    if redis_info:
        redis_port, redis_version = redis_info
        rm = redis_memory(redis_port, args.sessions)
        per = (rm["after"] - rm["before"]) / args.sessions
        print(f"| RedisStore ({redis_version}) | INFO memory used_memory, {rm['keys']:,} keys "
              f"(session + user index + sid index each) | {rm['before'] / MIB:.1f} MiB | {rm['after'] / MIB:.1f} MiB "
              f"| {per:,.0f} B | <= 2048 B {'✓' if per <= 2048 else '✗ missed'} |")
        print(f"\nA typical session: {rss.get('headers', '?')} identity headers (legacy ones included), {rss['header_bytes']} "
              f"bytes of names and values in wire form, the X-authentik-jwt value being a {rss['jwt_bytes']}-byte JWT that is "
              f"also the id_token (kept once, as the header value); "
              f"Redis value {rm['value_bytes']} bytes of JSON; {args.sessions:,} RedisStore.put (32 in flight) took "
              f"{rm['seconds']:.1f} s.", flush=True)
    else:
        print("\nredis-server not installed: no Redis figures (apt-get install redis-server)", flush=True)
    print("\n".join(signout_lines(args)), flush=True)
    print("\n".join(reload_lines(args, procs, tmp, mitmdump, confdir, up_port, idp_port)), flush=True)
    if redis_info and nginx:
        print("\n## Two lean replicas sharing Redis behind nginx\n", flush=True)
        print("\n".join(replicas(args, load, procs, tmp, nginx, confdir, up_port, idp_port, redis_info[0])), flush=True)
    print(f"\n(memory, sign-out, reload, Redis, replica{', soak' if args.soak else ''} measurements took "
          f"{time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
