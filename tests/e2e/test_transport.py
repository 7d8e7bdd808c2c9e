"""What travels through the outpost: WebSockets, large streamed bodies, TLS on both sides, failures."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from cryptography import x509
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from mitm_outpost.listeners import write_self_signed
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost, provider_entry

MB = 1 << 20


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[str]:
    def echo(connection: ServerConnection) -> None:
        user = connection.request.headers.get("X-authentik-username", "") if connection.request else ""
        for message in connection:
            connection.send(f"{user}:{message}")

    port = free_port()
    with serve(echo, "127.0.0.1", port) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{port}"
        server.shutdown()


def _session_cookie(outpost: Outpost) -> str:
    client = browser()
    mock_login(client, f"{outpost.url}/")
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


def test_websocket_passes_after_the_same_check(idp: str, ws_upstream: str) -> None:
    port = free_port()
    with Outpost([provider_entry("ws", port, ws_upstream, idp)], port) as outpost:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}/socket", additional_headers={"X-Requested-With": "XMLHttpRequest"}).close()
        assert refused.value.response.status_code == 401
        with connect(f"ws://127.0.0.1:{port}/socket", additional_headers={"Cookie": _session_cookie(outpost)}) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "alice:hello"


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_50mb_bodies_are_streamed_both_ways(idp: str, upstream: str) -> None:
    port = free_port()
    with Outpost([provider_entry("big", port, upstream, idp)], port) as outpost:
        client = browser()
        mock_login(client, f"{outpost.url}/")
        assert client.get(f"{outpost.url}/headers").status_code == 200
        assert outpost.proc is not None
        before = _peak_rss_kib(outpost.proc.pid)

        def body() -> Iterator[bytes]:
            for _ in range(50):
                yield b"y" * MB

        upload = client.post(f"{outpost.url}/upload", content=body(), headers={"Content-Length": str(50 * MB)},
                             timeout=60)
        assert upload.json() == {"received": 50 * MB}
        with client.stream("GET", f"{outpost.url}/download/{50 * MB}", timeout=60) as download:
            assert download.status_code == 200
            assert sum(len(chunk) for chunk in download.iter_bytes()) == 50 * MB
        growth_mib = (_peak_rss_kib(outpost.proc.pid) - before) / 1024
        assert growth_mib < 25, f"the outpost buffered the body: peak RSS grew {growth_mib:.0f} MiB"


def test_upstream_down_gives_a_502_page(idp: str) -> None:
    port, dead = free_port(), free_port()
    with Outpost([provider_entry("down", port, f"http://127.0.0.1:{dead}", idp)], port) as outpost:
        client = browser()
        mock_login(client, f"{outpost.url}/")
        response = client.get(f"{outpost.url}/anything")
        assert response.status_code == 502
        assert "Traceback" not in response.text
        assert outpost.proc is not None and outpost.proc.poll() is None


def _server_certificate(port: int, sni: str) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_https_listener_serves_provider_certificate_by_sni(idp: str, upstream: str, tmp_path: Path) -> None:
    port, tls_port, other = free_port(), free_port(), free_port()
    own_cert = write_self_signed(tmp_path / "app.pem", ["app.example.test"])
    providers = [
        provider_entry("plain", port, upstream, idp),
        provider_entry("own", other, upstream, idp, external_host="https://app.example.test",
                       certificate=str(own_cert)),
    ]
    with Outpost(providers, port, tls_port) as outpost:
        own = _server_certificate(tls_port, "app.example.test")
        assert (own.fingerprint(own.signature_hash_algorithm)  # type: ignore[arg-type]
                == x509.load_pem_x509_certificate(own_cert.read_bytes()).fingerprint(
                    own.signature_hash_algorithm))  # type: ignore[arg-type]
        default = _server_certificate(tls_port, "localhost")
        assert default.issuer.rfc4514_string() == "CN=mitm-outpost default certificate"
        assert "mitmproxy" not in default.issuer.rfc4514_string()
        # The HTTPS listener is the same outpost: the ping answers there too.
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with (socket.create_connection(("127.0.0.1", tls_port)) as raw,
              context.wrap_socket(raw, server_hostname="localhost") as tls):
            tls.sendall(b"GET /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 204")
        assert outpost.proc is not None


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pem = write_self_signed(tmp_path_factory.mktemp("tls") / "upstream.pem", ["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://localhost:{port}"
    server.shutdown()


@pytest.mark.parametrize("tool", ["mitmdump", "lean"])
@pytest.mark.parametrize("validate, status", [(True, 502), (False, 200)])
def test_upstream_tls_validation_follows_the_provider(idp: str, tls_upstream: str, validate: bool, status: int,
                                                      tool: str) -> None:
    port = free_port()
    entry = provider_entry("tls", port, tls_upstream, idp, internal_host_ssl_validation=validate)
    with Outpost([entry], port, tool=tool) as outpost:
        client = browser()
        mock_login(client, f"{outpost.url}/")
        response = client.get(f"{outpost.url}/")
        assert response.status_code == status, response.text
        if validate:  # the reason is the operator's to read, not the client's
            assert "certificate" in outpost.output.lower() and "certificate" not in response.text.lower()
            assert tls_upstream.rsplit(":", 1)[1] not in response.text




@pytest.fixture(scope="module")
def cut_short_upstream() -> Iterator[str]:
    """Answers 200 with a Content-Length, sends part of the body (small, or 2 MiB of a 5 MiB one), then closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(65536)
                big = b"/big" in head.split(b"\r\n", 1)[0]
                declared, sent = (5 * MB, 2 * MB) if big else (100, 3)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + b"x" * sent)

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_access_log_records_what_the_client_got_when_the_upstream_fails_mid_response(idp: str,
                                                                                       cut_short_upstream: str) -> None:
    port = free_port()
    with Outpost([provider_entry("cut", port, cut_short_upstream, idp)], port, tool="lean") as outpost:
        client = browser()
        mock_login(client, f"{outpost.url}/")
        small = client.get(f"{outpost.url}/small")
        assert small.status_code == 502 and cut_short_upstream.rsplit(":", 1)[1] not in small.text
        with pytest.raises(httpx2.RemoteProtocolError), client.stream("GET", f"{outpost.url}/big") as big:
            assert big.status_code == 200  # streamed: the status went out before the upstream failed
            for _ in big.iter_bytes():
                pass
        deadline = time.monotonic() + 5
        while '"path":"/big"' not in outpost.output:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        records = [json.loads(line.split(" mitm_outpost.access ", 1)[1])
                   for line in outpost.output.splitlines() if " mitm_outpost.access " in line]
        lines = {record["path"]: record for record in records}
        assert lines["/small"]["status"] == 502 and "incomplete" not in lines["/small"]
        assert lines["/big"]["status"] == 200 and lines["/big"]["incomplete"] is True


def test_the_strict_edge_holds_on_the_https_port_too(idp: str, upstream: str) -> None:
    """On 9443 mitmproxy stacks client TLS and HTTP in one step: the strict HTTP layer must be under TLS too."""
    port, tls_port = free_port(), free_port()
    with Outpost([provider_entry("tls-edge", port, upstream, idp, skip_path_regex="^/headers")], port, tls_port):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        forged = (f"GET /headers HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Note: a\rX-authentik-username: admin\r\n"
                  "Connection: close\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(forged)
            answer = tls.recv(200)
        assert answer.startswith(b"HTTP/1.1 400"), answer
