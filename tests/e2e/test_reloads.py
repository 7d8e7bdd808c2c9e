"""Reloads and state swaps that never stall the event loop or leave the outpost half changed."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx2
import pytest
import yaml

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.e2e.test_shared_sessions import EXTERNAL, Cluster, Replica
from tests.e2e.test_transport import tls_upstream  # noqa: F401 (fixture)
from tests.support.processes import Outpost, provider_entry
from tests.support.redis_server import RedisServer

BLOCKED_LOOP = 1.0  # seconds: far above a normal answer here, far below a stalled event loop


@pytest.fixture
def silent_issuer() -> Iterator[str]:
    """An issuer that accepts connections and never answers (the worst case for discovery)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _answer_times(url: str, seconds: float, **kwargs: object) -> list[float]:
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        response = httpx2.get(url, timeout=5, **kwargs)  # type: ignore[arg-type]
        times.append(time.monotonic() - started)
        assert response.status_code == 204, response.status_code
        time.sleep(0.05)
    return times


def _wait_for(outpost: Outpost, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in outpost.output:
        assert time.monotonic() < deadline, f"no {text!r} in the outpost's log"
        time.sleep(0.1)


@pytest.mark.parametrize("tool", ["lean", "mitmdump"])
def test_a_reload_whose_issuer_never_answers_stalls_nothing(idp: str, upstream: str, silent_issuer: str,
                                                            tool: str) -> None:
    port = free_port()
    with Outpost([provider_entry("app", port, upstream, idp)], port, tool=tool) as outpost:
        assert outpost.proc is not None
        client = browser()
        mock_login(client, f"{outpost.url}/headers")
        doc = yaml.safe_load(outpost.config.read_text())
        doc["providers"].append(provider_entry("hangs", port, upstream, silent_issuer, external_host="http://hangs.test"))
        outpost.config.write_text(yaml.safe_dump(doc))
        outpost.proc.send_signal(signal.SIGHUP)
        pings = _answer_times(f"{outpost.url}/outpost.goauthentik.io/ping", 3)
        signed_in = [time.monotonic()]
        assert client.get(f"{outpost.url}/headers").status_code == 200  # the old set serves meanwhile
        signed_in.append(time.monotonic())
        assert max(pings) < BLOCKED_LOOP and signed_in[1] - signed_in[0] < BLOCKED_LOOP, (max(pings), signed_in)
        _wait_for(outpost, "reload refused", 30)  # discovery times out: the old set stays whole
        assert client.get(f"{outpost.url}/headers").status_code == 200
        assert httpx2.get(f"{outpost.url}/", headers={"Host": "hangs.test"}).status_code == 400


def test_a_reload_from_memory_to_redis_starts_the_new_store(idp: str, upstream: str) -> None:
    """The swap starts the store it installs: revocations on another replica reach this one at once."""
    entry = {"name": "shared", "external_host": f"http://{EXTERNAL}", "internal_host": upstream, "issuer": idp,
             "client_id": "shared", "client_secret": "shared-secret", "access_token_validity": 60}
    with RedisServer() as server, Outpost([entry], free_port()) as switching, Replica(entry, server.url) as other:
        assert switching.proc is not None
        doc = yaml.safe_load(switching.config.read_text())
        doc["outpost"]["session_store"] = server.url
        switching.config.write_text(yaml.safe_dump(doc))
        switching.proc.send_signal(signal.SIGHUP)
        _wait_for(switching, "serving shared", 20)
        time.sleep(0.5)
        cluster = Cluster(server, (switching, other))  # type: ignore[arg-type]
        client = browser()
        cluster.login(client, start_on=0, callback_on=0)
        assert cluster.get(0, client, "/headers").status_code == 200  # now in the local cache of replica 0
        sign_out = cluster.get(1, client, "/outpost.goauthentik.io/sign_out")
        assert (sign_out.status_code, sign_out.headers["location"].startswith(f"{idp}/")) == (302, True)
        deadline = time.monotonic() + 1.0
        while cluster.get(0, client, "/headers").status_code == 200:
            assert time.monotonic() < deadline, "the revocation did not reach the reloaded replica within a second"
            time.sleep(0.05)


def test_validation_off_for_one_provider_leaves_the_other_checking(idp: str, tls_upstream: str) -> None:  # noqa: F811
    port = free_port()
    lax = provider_entry("lax", port, tls_upstream, idp, internal_host_ssl_validation=False)
    strict = provider_entry("strict", port, tls_upstream, idp, external_host=f"http://127.0.0.2:{port}")
    with Outpost([lax, strict], port) as outpost:
        lax_client, strict_client = browser(), browser()
        mock_login(lax_client, f"{outpost.url}/")
        mock_login(strict_client, f"http://127.0.0.2:{port}/")
        assert lax_client.get(f"{outpost.url}/").text == "hello"  # the lax provider reached the upstream first
        refused = strict_client.get(f"http://127.0.0.2:{port}/")
        assert refused.status_code == 502 and "hello" not in refused.text
        assert lax_client.get(f"{outpost.url}/").status_code == 200


def test_readiness_is_one_rule_on_both_ports(idp: str, upstream: str) -> None:
    entry = {"name": "shared", "external_host": f"http://{EXTERNAL}", "internal_host": upstream, "issuer": idp,
             "client_id": "shared", "client_secret": "shared-secret"}
    metrics = free_port()
    with RedisServer() as server:
        replica = Outpost([entry], free_port(), metrics_port=metrics)
        doc = yaml.safe_load(replica.config.read_text())
        doc["outpost"]["session_store"] = server.url
        replica.config.write_text(yaml.safe_dump(doc))
        with replica:
            pings = (f"{replica.url}/outpost.goauthentik.io/ping", f"http://127.0.0.1:{metrics}/outpost.goauthentik.io/ping")
            assert [httpx2.get(url).status_code for url in pings] == [204, 204]
            server.kill()
            deadline = time.monotonic() + 5
            while [httpx2.get(url).status_code for url in pings] != [503, 503]:
                assert time.monotonic() < deadline, [httpx2.get(url).status_code for url in pings]
                time.sleep(0.2)
