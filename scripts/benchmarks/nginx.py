"""nginx, as the upstream (it never is the bottleneck; a small asyncio server when it is not installed) and
in front of auth servers with docs/forward-auth/nginx-single.conf plus keep-alive."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from mitm_outpost.testing.forward_auth import find_nginx, nginx_single_conf
from mitm_outpost.testing.processes import Child

from .processes import wait_http
from .shared import BENCH_COMMAND, FORWARD_DOMAIN, HOST, KEEPALIVE, Bench

FORWARD_TEMPLATE = "docs/forward-auth/nginx-single.conf"

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


def start_nginx(bench: Bench, name: str, nginx: str, servers: str) -> tuple[Child, list[str]]:
    """One nginx (master + 1 worker) with the given http{} content, its state under tmp/name."""
    d = bench.tmp / name
    d.mkdir()
    (d / "nginx.conf").write_text(NGINX_MAIN.format(dir=d, servers=servers))
    argv = [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
    return bench.procs.start(name, argv), argv


def start_upstream(bench: Bench) -> tuple[str, list[str]]:
    """nginx when installed (it never is the bottleneck), else the asyncio server below: its kind and command."""
    nginx = find_nginx()
    if nginx:
        child, argv = start_nginx(bench, "upstream", nginx, UPSTREAM_SERVER.format(host=HOST, port=bench.upstream_port))
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
        kind = version.strip().replace("nginx version: ", "")
    else:
        argv = [*BENCH_COMMAND, "--serve-upstream", str(bench.upstream_port)]
        kind = "python asyncio server (nginx not installed)"
        child = bench.procs.start("upstream", argv)
    wait_http(bench.upstream + "/", child)
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
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


def forward_auth_servers(port: int, auth_port: int, upstream_port: int) -> str:
    """The server block of docs/forward-auth/nginx-single.conf, as documented except for keep-alive:
    `proxy_pass` to the auth server and to the upstream go through `upstream { keepalive }` blocks,
    and the outpost location speaks HTTP/1.1 with `Connection: ""` (the documented app location
    already does). Without this, nginx opens a new connection to mitmdump for every auth
    subrequest, and connection set-up, not the auth check, would be measured."""
    try:
        text = nginx_single_conf(port=port, domain=FORWARD_DOMAIN, outpost_host=HOST, outpost_port=auth_port,
                                 upstream_host=HOST, upstream_port=upstream_port)
    except KeyError as e:
        sys.exit(f"{FORWARD_TEMPLATE}: no value for {e}; update forward_auth_servers() in {__file__}")
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
                     f"update forward_auth_servers() in {__file__}")
        text = text.replace(old, new)
    return (f"    upstream bench_auth {{ server {HOST}:{auth_port}; keepalive {KEEPALIVE}; }}\n"
            f"    upstream bench_app {{ server {HOST}:{upstream_port}; keepalive {KEEPALIVE}; }}\n" + text)
