"""The servers of the throughput rows and the `Setup` each row measures: the ceilings (the upstream, bare
mitmdump), the outpost under mitmdump (three providers of one process), the lean runner, nginx auth_request
in front of each auth server, and the production runner with --workers. Each signed in before the load."""

from __future__ import annotations

from mitm_outpost.testing.forward_auth import find_nginx
from mitm_outpost.testing.processes import free_port
from mitm_outpost.testing.transport import LoopbackTransport

from .login import check_proxied, id_token, log_in
from .nginx import forward_auth_servers, start_nginx, start_upstream
from .outpost import (
    ACCESS_LOG_OFF,
    BEHIND_NGINX,
    forward_yaml,
    session_store,
    start_outpost,
    start_runner,
    wait_workers,
)
from .processes import wait_http
from .redis_server import start_redis
from .shared import FORWARD_DOMAIN, HOST, MITMDUMP, OUTPOST_DOMAIN, PING_PATH, USER, Bench, Setup
from .skip_rules import SKIP_PATH, SKIP_RULES, skipped_path

BARE_AUTH_SCRIPT = """\
# The reference auth server: mitmdump itself, answering every auth_request 200 with an empty body.
from mitmproxy import http


def request(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(200)
"""


def bare_mitmdump(bench: Bench, port: int, *script: str) -> list[str]:
    """`mitmdump -q [-s script] --mode reverse:<upstream>@<port>`: mitmproxy without our addons."""
    return [MITMDUMP, "-q", *script, "--set", bench.confdir, "--listen-host", HOST,
            "--mode", f"reverse:{bench.upstream}@{port}"]


def start_ceilings(bench: Bench) -> tuple[str, dict[str, Setup]]:
    """The upstream (`direct`, the machine's ceiling) and a bare `mitmdump --mode reverse` in front of it
    (`bare`, mitmproxy's own cost); also the upstream's kind, for the report."""
    upstream_kind, upstream_argv = start_upstream(bench)
    bare_port = free_port()
    bare_argv = bare_mitmdump(bench, bare_port)
    bare = bench.procs.start("bare-mitmdump", bare_argv)
    wait_http(f"http://{HOST}:{bare_port}/", bare)
    return upstream_kind, {
        "direct": Setup("nginx direct (ceiling)" if find_nginx() else "direct (python upstream, ceiling)",
                        bench.upstream + "/bench", upstream_argv, count_non_200=False),
        "bare": Setup("bare mitmdump -q", f"http://{HOST}:{bare_port}/bench", bare_argv, bare.pid),
    }


def start_outpost_setups(bench: Bench) -> dict[str, Setup]:
    """One outpost under mitmdump, three providers alike but for: `bench` has 1 skip rule, `skip` SKIP_RULES of
    them (what a long list of unauthenticated paths costs a request none matches), `header` verifies bearer
    JWTs locally (header auth, no cookie). One process, the provider picked by Host (one dict lookup, whatever
    their number): two identical mitmdump processes differ by a few % in req/s, as much as the cost being
    measured, so separate processes would compare processes, not configurations."""
    outpost, argv, port = start_outpost(
        bench, {"bench": (1, ""), "skip": (SKIP_RULES, ""), "header": (1, "    verify_bearer_jwt_locally: true\n")})
    wait_http(f"http://{HOST}:{port}{PING_PATH}", outpost, expect=204)
    url = f"http://{HOST}:{port}/bench"
    setups = {}
    for key, name, label, rules in (("outpost", "bench", "outpost (signed in)", 1),
                                    ("outpost_skip", "skip", f"outpost, {SKIP_RULES} skip rules (signed in)",
                                     SKIP_RULES)):
        host = f"Host: {name}.{OUTPOST_DOMAIN}:{port}"
        # the rules are loaded: a path they match needs no login and gets no identity
        check_proxied(f"http://{HOST}:{port}{skipped_path(rules)}", [host], user="")
        cookie = log_in(f"http://{name}.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())  # /bench is not skipped
        check_proxied(url, [f"Cookie: {cookie}", host])
        print(f"{label}: signed in as {USER} at {name}.{OUTPOST_DOMAIN}, session cookie {cookie.split('=')[0]}, "
              f"upstream answers 'hello {USER}'; {skipped_path(rules)} passes without login", flush=True)
        setups[key] = Setup(label, url, argv, outpost.pid, (f"Cookie: {cookie}", host))
    host = f"Host: header.{OUTPOST_DOMAIN}:{port}"
    bearer = f"Authorization: Bearer {id_token(bench.idp, 'header-client')}"
    check_proxied(url, [bearer, host])  # verifies the JWT and fills the cache the load then hits
    print(f"header auth at header.{OUTPOST_DOMAIN}: an ID token of the IdP for header-client, sent as a bearer "
          f"token without a cookie, upstream answers 'hello {USER}'", flush=True)
    setups["outpost_header"] = Setup("outpost, header auth (warm cache)", url, argv, outpost.pid, (bearer, host))
    return setups


def start_lean_setups(bench: Bench) -> dict[str, Setup]:
    """The lean runner, twice (same config, provider `bench` with its 1 skip rule): access log off (also the
    skip-rule row, no session), and the default JSON access log (one line per request to stderr, here a
    file) to show what it costs."""
    setups = {}
    for key, label, extra in (("lean", "lean runner, signed in", ACCESS_LOG_OFF),
                              ("lean_log", "lean runner, signed in, access log json", ())):
        child, argv, port = start_outpost(bench, {"bench": (1, "")}, runner="lean", name=key, extra=extra)
        wait_http(f"http://{HOST}:{port}{PING_PATH}", child, expect=204)
        host = f"Host: bench.{OUTPOST_DOMAIN}:{port}"
        lean_url = f"http://{HOST}:{port}/bench"
        if key == "lean":
            skip_url = f"http://{HOST}:{port}{SKIP_PATH}bench"
            check_proxied(skip_url, [host], user="")
            setups["lean_skip"] = Setup("lean runner, no auth (skip rule)", skip_url, argv, child.pid, (host,))
        cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
        check_proxied(lean_url, [f"Cookie: {cookie}", host])
        print(f"{label}: signed in as {USER}, upstream answers 'hello {USER}'", flush=True)
        setups[key] = Setup(label, lean_url, argv, child.pid, (f"Cookie: {cookie}", host))
    return setups


def signed_in_through_nginx(setup: Setup, front: int) -> Setup:
    """`setup` with the cookie of a login through its nginx at app.example.test:<front>, checked."""
    cookie = log_in(f"http://app.{FORWARD_DOMAIN}:{front}", LoopbackTransport())
    setup.headers = (f"Cookie: {cookie}", *setup.headers)
    check_proxied(setup.url, setup.headers)
    return setup


def start_forward_auth(bench: Bench, nginx: str) -> dict[str, Setup]:
    """nginx (docs/forward-auth/nginx-single.conf + keep-alive) in front of the upstream, three times:
    asking a bare mitmdump that answers 200 to everything, asking the outpost under mitmdump, and
    asking the lean runner (python -m mitm_outpost, access log off), each forward_single and signed in
    through its nginx like a browser at http://app.example.test:<port>."""
    bare_port, bare_front = free_port(), free_port()
    script = bench.tmp / "bare_auth.py"
    script.write_text(BARE_AUTH_SCRIPT)
    bare_argv = bare_mitmdump(bench, bare_port, "-s", str(script))
    bare = bench.procs.start("fwd-bare-mitmdump", bare_argv)
    wait_http(f"http://{HOST}:{bare_port}/", bare)

    auth_servers = {"fwd_bare": (bare_front, bare_port, bare_argv, bare.pid)}
    for key, runner, extra in (("fwd_outpost", "mitmdump", ()), ("fwd_lean", "lean", BEHIND_NGINX)):
        port, front = free_port(), free_port()
        child, argv = start_runner(bench, key, runner, forward_yaml(bench, front), port, extra)
        wait_http(f"http://{HOST}:{port}{PING_PATH}", child, expect=204)
        auth_servers[key] = (front, port, argv, child.pid)

    setups: dict[str, Setup] = {}
    for key, label in (("fwd_bare", "nginx auth_request → bare mitmdump"),
                       ("fwd_outpost", "nginx auth_request → outpost (mitmdump)"),
                       ("fwd_lean", "nginx auth_request → lean runner")):
        front, auth, auth_argv, pid = auth_servers[key]
        child, nginx_argv = start_nginx(bench, f"nginx-{key}", nginx,
                                        forward_auth_servers(front, auth, bench.upstream_port))
        # /outpost.goauthentik.io/ goes to the auth server without auth_request: proves nginx -> it.
        wait_http(f"http://{HOST}:{front}{PING_PATH}", child, expect=200 if key == "fwd_bare" else 204)
        host = f"Host: app.{FORWARD_DOMAIN}:{front}"
        setups[key] = Setup(label, f"http://{HOST}:{front}/bench", auth_argv, pid, (host,), nginx_argv)

    check_proxied(setups["fwd_bare"].url, setups["fwd_bare"].headers, user="")  # 200 'hello ': no identity
    for key in ("fwd_outpost", "fwd_lean"):
        front = auth_servers[key][0]
        fwd = signed_in_through_nginx(setups[key], front)
        print(f"{fwd.label}: signed in as {USER} through nginx at app.{FORWARD_DOMAIN}:{front}, "
              f"upstream answers 'hello {USER}'", flush=True)
    return setups


def start_worker_setups(bench: Bench, nginx: str | None) -> dict[str, Setup]:
    """The production runner with sessions in Redis (which `--workers` needs): proxy mode with
    `--workers 1` and `--workers 2`, and nginx auth_request to `--workers auto`, each signed in."""
    redis = start_redis(bench, "redis-workers")
    if redis is None:
        print("redis-server not installed: no --workers rows", flush=True)
        return {}
    store = session_store(redis[0])
    setups: dict[str, Setup] = {}
    for key, workers in (("lean_w1", "1"), ("lean_w2", "2")):
        child, argv, port = start_outpost(bench, {"bench": (1, "")}, runner="lean", name=key,
                                          extra=(*ACCESS_LOG_OFF, "--set", f"outpost_workers={workers}"), store=store)
        ping = f"http://{HOST}:{port}{PING_PATH}"
        if workers == "1":
            wait_http(ping, child, expect=204)
        else:
            wait_workers(ping, child)
        host = f"Host: bench.{OUTPOST_DOMAIN}:{port}"
        cookie = log_in(f"http://bench.{OUTPOST_DOMAIN}:{port}", LoopbackTransport())
        setups[key] = Setup(f"lean runner, Redis, --workers {workers}, signed in", f"http://{HOST}:{port}/bench",
                            argv, child.pid, (f"Cookie: {cookie}", host))
        check_proxied(setups[key].url, setups[key].headers)
    if nginx:
        port, front = free_port(), free_port()
        child, argv = start_runner(bench, "fwd_workers", "lean", forward_yaml(bench, front, store), port,
                                   (*BEHIND_NGINX, "--set", "outpost_workers=auto"))
        wait_workers(f"http://{HOST}:{port}{PING_PATH}", child)
        nginx_child, nginx_argv = start_nginx(bench, "nginx-fwd_workers", nginx,
                                              forward_auth_servers(front, port, bench.upstream_port))
        wait_http(f"http://{HOST}:{front}{PING_PATH}", nginx_child, expect=204)
        setups["fwd_workers"] = signed_in_through_nginx(
            Setup("nginx auth_request → lean runner, --workers auto (Redis)", f"http://{HOST}:{front}/bench", argv,
                  child.pid, (f"Host: app.{FORWARD_DOMAIN}:{front}",), nginx_argv), front)
    for setup in setups.values():
        print(f"{setup.label}: signed in as {USER}, upstream answers 'hello {USER}'", flush=True)
    return setups
