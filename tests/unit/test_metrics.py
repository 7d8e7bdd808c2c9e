"""Metrics: what each kind of request adds to the Prometheus metrics, with which label values, and the
metrics listener's port option. Requests go through the production chain (`chain.build`)."""

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client import generate_latest

from mitm_outpost import chain, metrics
from mitm_outpost.identity import user_headers
from mitm_outpost.prometheus_metrics import PROMETHEUS
from mitm_outpost.registry import Registry, parse_networks
from mitm_outpost.sessions import Session
from tests.unit.conftest import make_provider, signed_in

REQUESTS = "authentik_outpost_proxy_request_duration_seconds"
UPSTREAM = "authentik_outpost_proxy_upstream_response_duration_seconds"
DECISIONS = "mitm_outpost_decisions"
OUTPOST = "test-outpost"


@pytest.fixture(autouse=True)
def no_authentik(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTHENTIK_HOST", "AUTHENTIK_TOKEN", "AUTHENTIK_LISTEN__METRICS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry() -> Registry:
    """A proxy-mode provider (`app`) and a forward-auth one (`single`), checks trusted from loopback."""
    reg = Registry()
    reg.replace(OUTPOST, (
        make_provider(),
        make_provider(name="single", mode="forward_single", external_host="https://fwd.example.test", internal_host="",
                      client_id="single-client"),
    ))
    reg.trusted_networks = parse_networks(["127.0.0.0/8"])
    return reg


@contextlib.contextmanager
def outpost(registry: Registry) -> Iterator[taddons.context]:
    with taddons.context(chain.build(registry, interactive=False)) as tctx:
        yield tctx


def request(path: str = "/x", host: str = "app.example.test", method: str = "GET", **headers: str) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, method=method.encode(), path=path.encode(), headers=(),
                                    timestamp_start=1000.0, timestamp_end=1000.25))
    f.request.headers["Host"] = host
    for name, value in headers.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


async def through(tctx: taddons.context, f: http.HTTPFlow) -> http.HTTPFlow:
    """The request hooks; then the response: the upstream's (sent at 1001.0, done at 1001.5) when nothing
    answered, else the outpost's own answer with those timestamps."""
    await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    if f.response is None:
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
    if f.response is None:
        f.response = tutils.tresp()
    f.response.timestamp_start, f.response.timestamp_end = 1001.0, 1001.5
    await tctx.master.addons.handle_lifecycle(HttpResponseHook(f))
    return f


Sample = tuple[str, frozenset[tuple[str, str]]]


def key(name: str, /, **labels: str) -> Sample:
    return name, frozenset(labels.items())


def snapshot() -> dict[Sample, float]:
    return {key(s.name, **s.labels): s.value for m in PROMETHEUS.collect() for s in m.samples
            if s.name.endswith(("_count", "_sum", "_total"))}


def one_request(host: str, kind: str = "app") -> dict[Sample, float]:
    """What one answered GET adds to the request histogram: a count, and 1.5 s (the clock the tests set)."""
    labels = {"outpost_name": OUTPOST, "method": "GET", "host": host, "type": kind}
    return {key(REQUESTS + "_count", **labels): 1.0, key(REQUESTS + "_sum", **labels): 1.5}


@contextlib.contextmanager
def added() -> Iterator[dict[Sample, float]]:
    """What the block adds to every counter and histogram count and sum: {(sample, labels): increase}."""
    before = snapshot()
    changes: dict[Sample, float] = {}
    yield changes
    changes.update({k: round(v - before.get(k, 0.0), 6) for k, v in snapshot().items() if v != before.get(k, 0.0)})


async def test_a_signed_in_proxied_request_records_its_duration_its_upstream_time_and_the_decision(
        registry: Registry) -> None:
    cookie = await signed_in(registry)
    with outpost(registry) as tctx, added() as changes:
        f = await through(tctx, request("/x?q=1", Cookie=cookie))
    assert f.metadata["outpost"]["outcome"] == "allowed"
    app = {"outpost_name": OUTPOST, "method": "GET", "host": "app.example.test", "type": "app"}
    upstream = {"outpost_name": OUTPOST, "method": "GET", "scheme": "http", "host": "app.example.test",
                "upstream_host": "10.0.0.5:8080"}
    assert changes == {
        key(REQUESTS + "_count", **app): 1.0, key(REQUESTS + "_sum", **app): 1.5,  # 1000.0 -> 1001.5
        key(UPSTREAM + "_count", **upstream): 1.0, key(UPSTREAM + "_sum", **upstream): 0.75,  # 1000.25 -> 1001.0
        key(DECISIONS + "_total", provider="app", outcome="allowed"): 1.0,
    }


async def test_the_second_request_of_a_provider_is_recorded_under_the_same_labels(registry: Registry) -> None:
    """The label children are cached by provider name: the cache must give the same series each time."""
    cookie = await signed_in(registry)
    with outpost(registry) as tctx:
        await through(tctx, request(Cookie=cookie))
        with added() as changes:
            await through(tctx, request(Cookie=cookie))
            await through(tctx, request("/y", Cookie=cookie, Accept="text/html"))
    assert changes[key(REQUESTS + "_count", outpost_name=OUTPOST, method="GET", host="app.example.test",
                       type="app")] == 2.0
    assert changes[key(UPSTREAM + "_count", outpost_name=OUTPOST, method="GET", scheme="http",
                       host="app.example.test", upstream_host="10.0.0.5:8080")] == 2.0


async def test_a_forward_auth_check_records_the_request_and_decision_and_no_upstream_time(registry: Registry) -> None:
    single = registry.by_name["single"]
    await registry.store.put("sid-f", _session("single"))
    check = request("/outpost.goauthentik.io/auth/traefik", host="outpost:9000", X_Forwarded_Proto="https",
                    X_Forwarded_Host="fwd.example.test", X_Forwarded_Uri="/page", Cookie=f"{single.cookie_name}=sid-f")
    with outpost(registry) as tctx, added() as changes:
        f = await through(tctx, check)
    assert (f.response.status_code, f.metadata["outpost"]["outcome"]) == (200, "allowed")
    decision = key(DECISIONS + "_total", provider="single", outcome="allowed")
    assert changes == {**one_request("fwd.example.test"), decision: 1.0}


async def test_a_denial_records_the_request_and_a_denied_decision(registry: Registry) -> None:
    with outpost(registry) as tctx, added() as changes:
        f = await through(tctx, request(Accept="application/json"))
    assert f.response.status_code == 401
    decision = key(DECISIONS + "_total", provider="app", outcome="denied")
    assert changes == {**one_request("app.example.test"), decision: 1.0}


async def test_a_ping_is_a_request_of_type_ping_without_provider_or_decision(registry: Registry) -> None:
    with outpost(registry) as tctx, added() as changes:
        f = await through(tctx, request("/outpost.goauthentik.io/ping", host="anything.test"))
    assert f.response.status_code == 204
    assert changes == one_request("", kind="ping")


async def test_label_values_never_come_from_the_client(registry: Registry) -> None:
    """An unknown method is OTHER and an unknown Host is no host: a client cannot make new series."""
    with outpost(registry) as tctx, added() as changes:
        unknown_host = await through(tctx, request(host="evil-host.test"))
        odd_method = await through(tctx, request(method="EVILMETHOD"))
    assert (unknown_host.response.status_code, unknown_host.metadata["outpost"]["code"]) == (400, "unknown_host")
    assert odd_method.metadata["outpost"]["provider"] == "app"
    assert changes[key(REQUESTS + "_count", outpost_name=OUTPOST, method="GET", host="", type="app")] == 1.0
    assert changes[key(REQUESTS + "_count", outpost_name=OUTPOST, method="OTHER", host="app.example.test",
                       type="app")] == 1.0
    exposed = generate_latest(PROMETHEUS).decode()
    assert "evil-host" not in exposed and "EVILMETHOD" not in exposed


async def test_a_new_provider_set_is_recorded_under_its_own_labels(registry: Registry) -> None:
    cookie = await signed_in(registry)
    with outpost(registry) as tctx:
        await through(tctx, request(Cookie=cookie))
        registry.replace("renamed-outpost", (make_provider(external_host="https://app.example.test:8443"),))
        with added() as changes:
            await through(tctx, request(host="app.example.test:8443", Cookie=await signed_in(registry)))
    assert changes[key(REQUESTS + "_count", outpost_name="renamed-outpost", method="GET", host="app.example.test:8443",
                       type="app")] == 1.0
    assert changes[key(UPSTREAM + "_count", outpost_name="renamed-outpost", method="GET", scheme="http",
                       host="app.example.test:8443", upstream_host="10.0.0.5:8080")] == 1.0


@pytest.mark.parametrize("port", [-1, 65536])
def test_a_metrics_port_outside_0_to_65535_is_refused(registry: Registry, port: int) -> None:
    with outpost(registry) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"^metrics_port: a port number from 0 \(off\) to 65535$"):
            tctx.options.update(metrics_port=port)
        assert tctx.options.metrics_port == 9300  # the refused value was rolled back
        tctx.options.update(metrics_port=0)
        assert tctx.options.metrics_port == 0


def test_the_metrics_port_follows_authentik_s_listen_variable(registry: Registry,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_LISTEN__METRICS", "127.0.0.3:9301")
    with outpost(registry) as tctx:
        assert (tctx.options.metrics_listen_host, tctx.options.metrics_port) == ("127.0.0.3", 9301)


async def test_the_listener_serves_metrics_and_a_ping_that_follows_readiness() -> None:
    ready = [True]
    server = await metrics.serve("127.0.0.1", 0, lambda: b"some_metric 1\n", lambda: ready[0])
    port = server.sockets[0].getsockname()[1]
    try:
        assert await _get(port, "/metrics") == (b"HTTP/1.1 200 OK", b"some_metric 1\n")
        assert await _get(port, "/outpost.goauthentik.io/ping") == (b"HTTP/1.1 204 No Content", b"")
        assert await _get(port, "/akprox/ping?x=1") == (b"HTTP/1.1 204 No Content", b"")
        ready[0] = False
        assert await _get(port, "/outpost.goauthentik.io/ping") == (b"HTTP/1.1 503 Service Unavailable", b"")
        assert await _get(port, "/other") == (b"HTTP/1.1 404 Not Found", b"not found\n")
    finally:
        server.close()
        await server.wait_closed()


async def _get(port: int, path: str) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: metrics\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def _session(provider: str) -> Session:
    headers = user_headers({"sub": "u2", "preferred_username": "bob"}, "tok", True)
    return Session.of(provider=provider, sub="u2", headers=headers, expires_at=time.time() + 60)


def test_a_tally_adds_up_to_what_direct_updates_give() -> None:
    """Observations and counts through a Tally, flushed by a collection, expose what prometheus-client's own
    observe() and inc() give, bucket by bucket (bounds included: 0.005 falls in le=0.005)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from mitm_outpost.prometheus_metrics import Tally

    amounts = (0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 10.0, 11.0, 1e9)
    exposed = []
    for tallied in (False, True):
        reg, tally = CollectorRegistry(), Tally()
        if tallied:
            reg.register(tally)
        hist = Histogram("h_seconds", "h", ("a",), registry=reg).labels("x")
        count = Counter("c", "c", ("a",), registry=reg).labels("x")
        for amount in amounts:
            tally.observe(hist, amount) if tallied else hist.observe(amount)
            tally.inc(count) if tallied else count.inc()
        exposed.append("\n".join(line for line in generate_latest(reg).decode().splitlines()
                                  if "_created" not in line))  # when each was made
    assert exposed[0] == exposed[1]
    assert 'h_seconds_bucket{a="x",le="0.005"} 3.0' in exposed[1] and 'c_total{a="x"} 9.0' in exposed[1]
