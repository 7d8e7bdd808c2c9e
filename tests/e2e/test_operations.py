"""Operating the outpost: the lean runner, metrics, structured logs, SIGHUP and SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import RUNNERS, Outpost, provider_entry


def LeanOutpost(providers: list[dict[str, object]], http_port: int, metrics_port: int = 0) -> Outpost:  # noqa: N802
    """`python -m mitm_outpost`: the production runner, same options as mitmdump."""
    return Outpost(providers, http_port, tool="lean", metrics_port=metrics_port)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx2.get(f"http://127.0.0.1:{port}/metrics").text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


@pytest.fixture
def lean(idp: str, upstream: str) -> Iterator[tuple[Outpost, int]]:
    port, metrics_port = free_port(), free_port()
    with LeanOutpost([provider_entry("lean", port, upstream, idp)], port, metrics_port) as outpost:
        yield outpost, metrics_port


def test_lean_runner_serves_logins_metrics_and_structured_logs(lean: tuple[Outpost, int]) -> None:
    outpost, metrics_port = lean
    client = browser()
    mock_login(client, f"{outpost.url}/headers")
    assert client.get(f"{outpost.url}/headers?token=secret-in-query").status_code == 200
    assert httpx2.get(f"http://127.0.0.1:{metrics_port}/outpost.goauthentik.io/ping").status_code == 204
    samples = scrape(metrics_port)
    assert any(labels["outpost_name"] == "test-outpost" for labels, _ in samples["authentik_outpost_info"])
    decisions = {(labels["provider"], labels["outcome"]): value
                 for labels, value in samples["mitm_outpost_decisions_total"]}
    assert decisions[("lean", "allowed")] >= 1 and decisions[("lean", "redirected")] >= 1
    assert sum(v for _, v in samples["mitm_outpost_logins_total"]) == 1
    assert any(labels["call"] == "token" for labels, _ in samples["mitm_outpost_idp_request_duration_seconds_count"])
    assert any(labels["host"] == f"127.0.0.1:{outpost.http_port}"
               for labels, _ in samples["authentik_outpost_proxy_request_duration_seconds_count"])
    lines = [json.loads(line.split("mitm_outpost.access ", 1)[1]) for line in outpost.output.splitlines()
             if "mitm_outpost.access {" in line]
    allowed = [line for line in lines if line["decision"] == "allowed"]
    assert (allowed and allowed[-1]["path"] == "/headers" and allowed[-1]["uid"] == "alice"
            and allowed[-1]["status"] == 200)
    assert "upstream_ms" in allowed[-1] and "secret-in-query" not in outpost.output


def test_metric_labels_stay_bounded_under_random_hosts(lean: tuple[Outpost, int]) -> None:
    outpost, metrics_port = lean
    with httpx2.Client() as client:
        for i in range(1000):
            client.get(f"{outpost.url}/x", headers={"Host": f"random-{i}.example.test"})
    samples = scrape(metrics_port)
    hosts = {labels["host"] for labels, _ in samples["authentik_outpost_proxy_request_duration_seconds_count"]}
    assert len(hosts) <= 2, hosts  # the provider's host and "" (no provider)
    assert len(samples["authentik_outpost_proxy_request_duration_seconds_count"]) < 20


def test_sighup_reloads_a_good_file_and_refuses_a_bad_one(idp: str, upstream: str) -> None:
    port = free_port()
    with LeanOutpost([provider_entry("before", port, upstream, idp)], port) as outpost:
        assert outpost.proc is not None
        doc = yaml.safe_load(outpost.config.read_text())
        doc["providers"][0]["name"] = "after"
        outpost.config.write_text(yaml.safe_dump(doc))
        outpost.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "serving after" not in outpost.output:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        outpost.config.write_text("providers: [")
        outpost.proc.send_signal(signal.SIGHUP)
        while "reload refused" not in outpost.output:
            assert time.monotonic() < deadline + 10
            time.sleep(0.1)
        client = browser()
        mock_login(client, f"{outpost.url}/headers")
        seen = {k.lower(): v for k, v in client.get(f"{outpost.url}/headers").json()["headers"]}
        assert seen["x-authentik-meta-provider"] == "after"  # the good reload still serves


class _Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        time.sleep(2)
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"done")

    def log_message(self, *args: object) -> None:
        pass


def test_sigterm_drains_a_slow_request_then_exits(idp: str) -> None:
    slow_port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", slow_port), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    try:
        entry = provider_entry("slow", port, f"http://127.0.0.1:{slow_port}", idp, skip_path_regex="^/open$")
        with LeanOutpost([entry], port) as outpost:
            assert outpost.proc is not None
            result: dict[str, httpx2.Response] = {}
            request = threading.Thread(
                target=lambda: result.setdefault("r", httpx2.get(f"{outpost.url}/open", timeout=10)))
            request.start()
            time.sleep(0.5)
            outpost.proc.send_signal(signal.SIGTERM)
            request.join(10)
            assert result["r"].status_code == 200 and result["r"].text == "done"
            assert outpost.proc.wait(10) == 0
            assert "waiting for 1 request(s) in flight" in outpost.output
    finally:
        server.shutdown()


def test_mitmdump_way_has_the_same_metrics(idp: str, upstream: str) -> None:
    port, metrics_port = free_port(), free_port()
    outpost = Outpost([provider_entry("dump", port, upstream, idp)], port, metrics_port=metrics_port)
    with outpost:
        browser().get(f"{outpost.url}/x")
        assert "mitm_outpost_decisions_total" in scrape(metrics_port)


@pytest.mark.parametrize("tool", RUNNERS)
def test_lean_runner_applies_option_defaults(idp: str, tool: str) -> None:
    """trusted_proxies keeps its default (loopback) without being set: forward-auth checks from here are answered
    (by the lean runner's fast lane, and under mitmdump alike)."""
    port = free_port()
    entry = {"name": "fwd", "mode": "forward_single", "external_host": "http://app.example.test", "client_id": "f",
             "client_secret": "f", "issuer": idp}
    with Outpost([entry], port, tool=tool) as outpost:
        headers = {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "app.example.test", "X-Forwarded-Uri": "/"}
        response = httpx2.get(f"{outpost.url}/outpost.goauthentik.io/auth/traefik", headers=headers)
        assert response.status_code == 302 and "untrusted" not in outpost.output
