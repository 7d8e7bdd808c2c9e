"""authentik's own documented nginx config (seed 004, /akprox paths) in front of the outpost.

The file is used as printed, with only what its comments ask the reader to fill in: hosts,
ports, the certificate and the application's `proxy_pass`. It sends the outpost nothing but
`Host` (no port, no original URL), and the login still ends on the page the user asked for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx2
import pytest

from mitm_outpost.listeners import write_self_signed
from mitm_outpost.testing.processes import free_port
from mitm_outpost.testing.transport import LoopbackTransport
from tests.support.processes import RUNNERS, Outpost
from tests.support.proxies import DOCS_DIR, Nginx, render_text, require_or_skip


@pytest.mark.parametrize("tool", RUNNERS)
def test_seed_004_nginx_standalone(idp: str, upstream: str, tmp_path: Path, tool: str) -> None:
    require_or_skip("nginx")
    tls_port, outpost_port = free_port(), free_port()
    text = (DOCS_DIR / "seed/004-nginx-standalone.conf").read_text()
    cert = write_self_signed(tmp_path / "nginx.pem", ["app.example.test"])
    text = render_text(text, tls_port=tls_port, outpost_host="127.0.0.1", outpost_port=outpost_port,
                       authentik_host="auth.example.test", placeholders="")
    text = text.replace("/etc/ssl/certs/ssl-cert-snakeoil.pem", str(cert)).replace(
        "/etc/ssl/private/ssl-cert-snakeoil.key", str(cert))
    text = text.replace("# proxy_pass          http://localhost:5000;", f"proxy_pass          {upstream};")
    entry = {"name": "seed", "mode": "forward_single", "external_host": f"https://app.example.test:{tls_port}",
             "client_id": "seed", "client_secret": "seed-secret", "issuer": idp}
    with Outpost([entry], outpost_port, tool=tool), Nginx(text, tempfile.mkdtemp(prefix="seed-"), port=tls_port):
        client = httpx2.Client(transport=LoopbackTransport(verify=False), follow_redirects=False,
                               headers={"Accept": "text/html"}, timeout=15)
        target = f"https://app.example.test:{tls_port}/headers?x=1"
        response = client.get(target)
        assert response.status_code == 302
        assert response.headers["location"] == f"https://app.example.test:{tls_port}/akprox/start?rd=/headers?x=1"
        response = client.get(response.headers["location"])
        assert response.status_code == 302 and response.headers["location"].startswith(idp)
        response = client.post(response.headers["location"], data={"sub": "alice"})
        response = client.get(response.headers["location"])  # the callback, through nginx's /akprox location
        assert response.status_code == 302 and response.headers["location"] == target
        seen = {k.lower(): v for k, v in client.get(target).json()["headers"]}
        assert seen["x-auth-username"] == "alice" and seen["x-forwarded-email"] == "alice@example.test"


@pytest.mark.parametrize("tool", RUNNERS)
def test_seed_002_nginx_needs_only_its_undefined_variable(idp: str, upstream: str, tool: str) -> None:
    """seed 002's nginx block uses `$escaped_request_uri`, which nginx does not have: as printed,
    nginx refuses it. Defined (a one-line map), the rest works as printed: `auth_request
    /akprox/auth?nginx` (which nginx sends as `/akprox/auth%3Fnginx`), /akprox/start and the callback."""
    require_or_skip("nginx")
    port, outpost_port = free_port(), free_port()
    block = render_text((DOCS_DIR / "seed/002-nginx-standalone.conf").read_text(), outpost_host="127.0.0.1",
                        outpost_port=outpost_port, placeholders="")
    block = block.replace("# All your other options...", f"proxy_pass {upstream};")
    server = f"server {{\n    listen 127.0.0.1:{port};\n    server_name app.example.test;\n{block}\n}}\n"
    refused = Nginx(server, tempfile.mkdtemp(prefix="seed-"), port=port)
    try:
        refused.start()
        raise AssertionError("nginx accepted an undefined variable")
    except RuntimeError as e:
        assert "escaped_request_uri" in str(e)
    defined = "map $request_uri $escaped_request_uri { default $request_uri; }\n" + server
    entry = {"name": "seed002", "mode": "forward_single", "external_host": f"http://app.example.test:{port}",
             "client_id": "seed002", "client_secret": "seed-secret", "issuer": idp}
    with Outpost([entry], outpost_port, tool=tool), Nginx(defined, tempfile.mkdtemp(prefix="seed-"), port=port):
        client = httpx2.Client(transport=LoopbackTransport(), follow_redirects=False, headers={"Accept": "text/html"},
                               timeout=15)
        target = f"http://app.example.test:{port}/headers"
        # The seed puts `error_page 401` in the /akprox location, not in `/`: the browser gets the 401 itself.
        assert client.get(target).status_code == 401
        start = client.get(f"http://app.example.test:{port}/akprox/start?rd=/headers")
        assert start.status_code == 302 and start.headers["location"].startswith(idp)
        response = client.post(start.headers["location"], data={"sub": "alice"})
        response = client.get(response.headers["location"])  # /akprox/callback through nginx's /akprox location
        assert response.status_code == 302 and response.headers["location"] == target
        assert client.get(target).status_code == 200  # nginx's `auth_request /akprox/auth?nginx` now says yes
