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


def log_in(origin: str, transport: httpx2.BaseTransport | None = None) -> str:
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
    if "fwd_outpost" in results:
        print("\nForward-auth rows: req/s through nginx, proxy CPU = the auth server's (outpost or bare mitmdump), "
              "not nginx's.")
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
    print(f"| bare mitmdump / direct | {bare.rps / direct.rps:.4f} | | – |")
    print(f"| outpost / direct | {outpost.rps / direct.rps:.4f} | | – |")
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


# ---------------------------------------------------------------- main


def profile(args: argparse.Namespace, procs: Processes, pid: int) -> subprocess.Popen:
    """py-spy samples the process under test (the outpost by default, see --profile-setup) for one
    warm-up and measurement, without pausing it (--nonblocking), so it costs that process little;
    that round's numbers are still a bit lower."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not spy:
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    fmt = {".svg": "flamegraph", ".txt": "raw"}.get(Path(args.profile).suffix, "speedscope")
    return procs.start("py-spy", [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "250", "--duration",
                                  str(args.warmup + args.duration), "--format", fmt, "-o", str(Path(args.profile).resolve())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 1 s warm-up, 2 rounds: seven "
                        "setups, whole run about 1 min (an explicit --duration/--warmup/--rounds wins)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, help="seconds of discarded load before each measurement (default 3)")
    parser.add_argument("--rounds", type=int, help="rounds of the measurements; medians are "
                        "reported, since a neighbour's burst of CPU can halve one measurement (default 3, --quick 2)")
    parser.add_argument("--connections", type=int, default=16, help="open connections (default 16, as in spec §7)")
    parser.add_argument("--threads", type=int, default=1, help="load tool threads (default 1)")
    parser.add_argument("--load-tool", choices=["auto", "wrk", "h2load"], default="auto", help="default: wrk if installed")
    parser.add_argument("--profile", metavar="FILE", help="record the outpost (see --profile-setup) under load "
                        "(first round) with py-spy "
                        "(.venv/bin/pip install py-spy) into FILE: .svg flame graph, .txt collapsed stacks, else speedscope JSON")
    parser.add_argument("--profile-setup", choices=["outpost", "outpost_skip", "outpost_header", "fwd_outpost", "bare", "fwd_bare"], default="outpost",
                        help="which process --profile records: the outpost in proxy mode (default), the outpost "
                        "behind nginx auth_request, the outpost with 100 skip rules or with header auth, or the bare mitmdump of "
                        "either mode, for comparison")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
        return
    quick = (2, 1) if args.quick else (10, 3)
    args.duration = quick[0] if args.duration is None else args.duration
    args.warmup = quick[1] if args.warmup is None else args.warmup
    args.rounds = (2 if args.quick else 3) if args.rounds is None else args.rounds
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


def start_outpost(procs: Processes, tmp: Path, mitmdump: str, confdir: str, up_port: int, idp_port: int,
                  providers: dict[str, tuple[int, str]]) -> tuple[subprocess.Popen, list[str], int]:
    """One outpost whose proxy providers, {name: (skip rules, more YAML lines)}, are all in front of
    the upstream, at http://<name>.outpost.test:<port> with client `<name>-client`."""
    port = free_port()
    config = tmp / "outpost.yaml"
    config.write_text(OUTPOST_CONFIG.format(providers="".join(
        OUTPOST_PROVIDER.format(name=name, hostname=f"{name}.{OUTPOST_DOMAIN}", host=HOST, port=port, upstream=up_port,
                                idp=idp_port, extra=skip_rules_yaml(rules) + extra)
        for name, (rules, extra) in providers.items())))
    argv = [mitmdump, "-q", "-s", "addons/outpost.py", "--set", confdir, "--set", f"outpost_config={config}",
            "--set", f"outpost_http_port={port}", "--set", "outpost_https_port=0",
            "--set", f"outpost_listen_host={HOST}", "--set", "listen_port=0", *NO_METRICS]
    return procs.start("outpost", argv), argv, port


def start_forward_auth(procs: Processes, tmp: Path, nginx: str, mitmdump: str, confdir: str,
                       up_port: int, idp_port: int) -> dict[str, Setup]:
    """nginx (docs/forward-auth/nginx-single.conf + keep-alive) in front of the upstream, twice:
    asking a bare mitmdump that answers 200 to everything, and asking the outpost (forward_single),
    signed in through that nginx like a browser at http://app.example.test:<port>."""
    bare_port, bare_front, outpost_port, outpost_front = (free_port() for _ in range(4))
    upstream = f"http://{HOST}:{up_port}"

    script = tmp / "bare_auth.py"
    script.write_text(BARE_AUTH_SCRIPT)
    bare_argv = [mitmdump, "-q", "-s", str(script), "--set", confdir, "--listen-host", HOST,
                 "--mode", f"reverse:{upstream}@{bare_port}"]
    bare = procs.start("fwd-bare-mitmdump", bare_argv)

    config = tmp / "outpost-forward.yaml"
    config.write_text(OUTPOST_FORWARD_CONFIG.format(domain=FORWARD_DOMAIN, port=outpost_front, host=HOST, idp=idp_port))
    outpost_argv = [mitmdump, "-q", "-s", "addons/outpost.py", "--set", confdir, "--set", f"outpost_config={config}",
                    "--set", f"outpost_http_port={outpost_port}", "--set", "outpost_https_port=0",
                    "--set", f"outpost_listen_host={HOST}", "--set", "listen_port=0", *NO_METRICS]
    outpost = procs.start("fwd-outpost", outpost_argv)
    wait_http(f"http://{HOST}:{bare_port}/", procs, bare)
    wait_http(f"http://{HOST}:{outpost_port}/outpost.goauthentik.io/ping", procs, outpost, expect=204)

    setups: dict[str, Setup] = {}
    for key, label, front, auth, auth_argv, pid in (
        ("fwd_bare", "nginx auth_request → bare mitmdump", bare_front, bare_port, bare_argv, bare.pid),
        ("fwd_outpost", "nginx auth_request → outpost", outpost_front, outpost_port, outpost_argv, outpost.pid),
    ):
        proc, nginx_argv = start_nginx(procs, tmp, f"nginx-{key}", nginx, forward_auth_servers(front, auth, up_port))
        # /outpost.goauthentik.io/ goes to the auth server without auth_request: proves nginx -> it.
        ping = f"http://{HOST}:{front}/outpost.goauthentik.io/ping"
        wait_http(ping, procs, proc, expect=204 if key == "fwd_outpost" else 200)
        host = f"Host: app.{FORWARD_DOMAIN}:{front}"
        setups[key] = Setup(label, f"http://{HOST}:{front}/bench", auth_argv, pid, (host,), nginx_argv)

    check_proxied(setups["fwd_bare"].url, setups["fwd_bare"].headers, user="")  # 200 'hello ': no identity
    fwd = setups["fwd_outpost"]
    cookie = log_in(f"http://app.{FORWARD_DOMAIN}:{outpost_front}", LoopbackTransport())
    fwd.headers = (f"Cookie: {cookie}", *fwd.headers)
    check_proxied(fwd.url, fwd.headers)
    print(f"forward auth: signed in as {USER} through nginx at app.{FORWARD_DOMAIN}:{outpost_front}, "
          f"upstream answers 'hello {USER}'", flush=True)
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
        "direct": Setup("direct (upstream)", upstream + "/bench", upstream_argv, count_non_200=False),
        "bare": Setup("bare mitmdump", f"http://{HOST}:{bare_port}/bench", bare_argv, bare.pid),
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
    nginx = find_nginx()
    if nginx:
        setups.update(start_forward_auth(procs, tmp, nginx, mitmdump, confdir, up_port, idp_port))
    else:
        print("nginx not installed: no forward-auth measurement", flush=True)
    non_200 = tmp / "non200.lua"
    non_200.write_text(NON_200_SCRIPT)
    rounds: dict[str, list[Result]] = {key: [] for key in setups}
    for n in range(args.rounds):
        for key, s in setups.items():
            print(f"round {n + 1}/{args.rounds}, {s.label}: {s.url} ({args.warmup} s warm-up + {args.duration} s)", flush=True)
            profiled = args.profile and key == args.profile_setup and n == 0
            spy = profile(args, procs, s.pid) if profiled else None  # type: ignore[arg-type]
            r = load.run(s.label, s.url, args.duration, list(s.headers), args.warmup, s.pid,
                         non_200 if s.count_non_200 else None)
            r.server = shlex.join(s.server) if not s.via else f"{shlex.join(s.via)}` asking `{shlex.join(s.server)}"
            rounds[key].append(r)
            print(f"  {r.rps:,.0f} req/s, p99 {fmt(r.p99_ms, '.2f', ' ms')}{', ' + r.errors if r.errors else ''}", flush=True)
            if any(h.startswith(("Cookie:", "Authorization:")) for h in s.headers) and "not 200" in r.errors:
                changed = " addons/ changed during the run (mitmdump reloads addons/outpost.py when it changes, " \
                          "which drops the sessions)." if addons_mtime() != mtime else ""
                sys.exit(f"{s.label}: {r.errors}: the session (or bearer token) stopped working, so this measured "
                         f"something else (login redirects, 401s?).{changed}")
            if spy:
                spy.wait(30)
                print(f"  profile of {s.label} under load: {args.profile}", flush=True)
    for key in ("outpost", "outpost_skip", "outpost_header", "fwd_outpost"):  # still signed in: no number came from login redirects
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
                     f"{args.warmup} s warm-up + {args.duration} s per measurement, {args.rounds} round(s), "
                     + ("median shown" if args.rounds != 2 else "the slower of the 2 rounds shown (--quick: 2 rounds)"),
        "mitmproxy": f"{mitmproxy.version.VERSION}, Python {sys.version.split()[0]}",
    }
    info["outpost"] = (f"one process, three proxy providers picked by Host: bench.{OUTPOST_DOMAIN} with 1 skip rule "
                       f"(`^{SKIP_PATH}`), skip.{OUTPOST_DOMAIN} with {SKIP_RULES} (`^{SKIP_PATH}section-<i>/`, "
                       f"i < {SKIP_RULES}; none matches /bench), header.{OUTPOST_DOMAIN} (1 rule, header auth)")
    info["header auth"] = ("provider with `verify_bearer_jwt_locally: true`, `Authorization: Bearer <ID token of the IdP "
                           "for its client>` and no cookie; the warm-up fills the cache (header_auth_cache_ttl default)")
    if "fwd_outpost" in setups:
        info["forward auth"] = (f"nginx (1 worker) with {FORWARD_TEMPLATE.relative_to(ROOT)}, except `upstream {{ keepalive "
                                f"{KEEPALIVE}; }}` to the auth server and to the upstream, HTTP/1.1 and `Connection: \"\"` "
                                f"to the auth server; outpost provider mode forward_single")
    report(rounds, info, short=args.duration < 5)


if __name__ == "__main__":
    main()
