"""The authentik API double itself: its endpoints, pagination, auth, faults and websocket, and
that what it serves matches authentik's published schema (tests/support/authentik_api.py)."""

from __future__ import annotations

import http.client
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support.authentik_api import (
    ACK,
    HELLO,
    SESSION_END,
    TRIGGER_UPDATE,
    AuthentikAPIDouble,
    ContractViolation,
    hash_session_key,
    load_components,
    make_provider,
    self_signed_certificate,
    validate,
)

HELLO_ARGS = {"version": "2025.12.4", "buildHash": "", "uuid": str(uuid.uuid4()), "golangVersion": "",
              "opensslEnabled": False, "opensslVersion": "", "fipsEnabled": False, "hostname": "test"}


@pytest.fixture
def ak() -> Iterator[AuthentikAPIDouble]:
    with AuthentikAPIDouble() as double:
        yield double


def get(ak: AuthentikAPIDouble, path: str, token: str | None = "", headers: dict[str, str] | None = None,
        ) -> tuple[int, Any, http.client.HTTPResponse]:
    """GET on a fresh connection; token "" means the right one, None means no Authorization header."""
    conn = http.client.HTTPConnection("127.0.0.1", ak.port, timeout=5)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token or ak.token}"
    conn.request("GET", path, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw
    return resp.status, body, resp


def providers(n: int) -> list[dict[str, Any]]:
    # names out of order, to see the server sort them like authentik (ordering = ["name"])
    names = [f"app{i}" for i in (3, 1, 5, 2, 4)][:n]
    return [make_provider(name, f"http://{name}.example.test", f"http://127.0.0.1:{8000 + i}", "proxy",
                          f"client-{name}", f"secret-{name}") for i, name in enumerate(names)]


# --- the fixture ---------------------------------------------------------------------------------


def test_fixture_is_sourced_self_contained_and_valid_json_schema() -> None:
    doc = load_components()
    source = doc["x-source"]
    assert source["tag"] == "v3.2025.12.4" and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    schemas = doc["components"]["schemas"]
    for name in ("Outpost", "PaginatedOutpostList", "ProxyOutpostConfig", "PaginatedProxyOutpostConfigList",
                 "CertificateKeyPair", "CertificateData", "Config", "Pagination", "ProxyMode", "OutpostTypeEnum",
                 "OpenIDConnectConfiguration", "Provider", "ServiceConnection", "ErrorReportingConfig"):
        assert name in schemas
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= set(schemas), refs - set(schemas)
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert not re.search(r'"nullable"', json.dumps(schemas)), "OpenAPI-only keyword left in the fixture"
    assert schemas["ProxyMode"]["enum"] == ["proxy", "forward_single", "forward_domain"]


def test_make_provider_is_a_complete_proxy_outpost_config() -> None:
    p = make_provider("App", "https://app.example.test", "http://10.0.0.1:8080", "forward_single", "cid", "sec",
                      None, skip_path_regex="^/health$")
    validate("ProxyOutpostConfig", p)
    validate("ProxyOutpostConfig", p, strict=False)
    assert p["assigned_application_slug"] == "app" and p["mode"] == "forward_single"
    assert p["oidc_configuration"]["end_session_endpoint"] == "http://authentik.test/application/o/app/end-session/"
    assert re.fullmatch(r"[A-Z0-9]{32}", p["cookie_secret"])
    # the published schema only requires a few fields; the double's strict check wants all of them
    partial = {k: v for k, v in p.items() if k != "client_secret"}
    validate("ProxyOutpostConfig", partial, strict=False)
    with pytest.raises(ContractViolation, match="client_secret"):
        validate("ProxyOutpostConfig", partial)
    with pytest.raises(ContractViolation, match="extrnal_host"):
        make_provider("x", "http://x.test", extrnal_host="typo")
    with pytest.raises(ContractViolation, match="mode"):
        make_provider("x", "http://x.test", "", "magic")


def test_invalid_data_from_a_test_fails_at_once(ak: AuthentikAPIDouble) -> None:
    bad = make_provider("a", "http://a.test")
    del bad["oidc_configuration"]["jwks_uri"]
    with pytest.raises(ContractViolation, match="jwks_uri"):
        ak.set_providers([bad])
    with pytest.raises(ContractViolation, match="refresh_interval_s"):
        ak.set_outpost(refresh_interval_s="soon")  # type: ignore[arg-type]


# --- REST endpoints ------------------------------------------------------------------------------


def test_every_endpoint_answers_with_a_valid_body(ak: AuthentikAPIDouble) -> None:
    cert, key, fingerprint = self_signed_certificate("app.example.test")
    kp = str(uuid.uuid4())
    ak.add_certificate(kp, cert, key, fingerprint)
    ak.set_providers([make_provider("app", "https://app.example.test", "http://127.0.0.1:1", certificate=kp)])

    status, body, resp = get(ak, "/api/v3/outposts/instances/")
    assert status == 200 and resp.getheader("Content-Type") == "application/json"
    validate("PaginatedOutpostList", body)
    outpost = body["results"][0]
    assert outpost["pk"] == ak.outpost_pk and outpost["type"] == "proxy" and outpost["managed"] is None
    assert outpost["config"]["authentik_host"] == ak.url and outpost["refresh_interval_s"] == 300
    assert outpost["providers"] == [ak.providers[0]["pk"]]

    status, body, _ = get(ak, "/api/v3/root/config/")
    assert status == 200
    validate("Config", body)

    status, body, _ = get(ak, "/api/v3/outposts/proxy/?page=1&page_size=100")
    assert status == 200 and body["results"][0]["certificate"] == kp
    validate("PaginatedProxyOutpostConfigList", body)

    status, body, _ = get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/")
    assert status == 200 and body["fingerprint_sha256"] == fingerprint and body["private_key_available"]
    validate("CertificateKeyPair", body)
    assert body["key_type"] == "ec" and body["cert_subject"] == "CN=app.example.test"
    status, body, _ = get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/view_certificate/")
    assert status == 200 and body == {"data": cert}
    status, body, _ = get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/view_private_key/")
    assert status == 200 and body == {"data": key}
    assert ak.certificate_fetches(kp) == {"keypair": 1, "certificate": 1, "private_key": 1}

    status, body, _ = get(ak, f"/api/v3/crypto/certificatekeypairs/{uuid.uuid4()}/")
    assert status == 404 and body == {"detail": "No CertificateKeyPair matches the given query."}
    status, body, _ = get(ak, "/api/v3/nothing/")
    assert status == 404 and body == {"detail": "Not found."}
    assert ak.count("/api/v3/outposts/proxy/") == 1
    assert ak.requests[0].headers["authorization"] == f"Bearer {ak.token}"


def test_outpost_reflects_set_outpost(ak: AuthentikAPIDouble) -> None:
    ak.set_outpost(name="edge", managed="goauthentik.io/outposts/embedded", refresh_interval_s=30,
                   log_level="trace", authentik_host="https://auth.example.test/")
    _, body, _ = get(ak, "/api/v3/outposts/instances/")
    outpost = body["results"][0]
    assert outpost["name"] == "edge" and outpost["managed"] == "goauthentik.io/outposts/embedded"
    assert outpost["refresh_interval_s"] == 30 and outpost["config"]["refresh_interval"] == "seconds=30"
    assert outpost["config"]["log_level"] == "trace"
    assert outpost["config"]["authentik_host"] == "https://auth.example.test/"


def test_pagination_over_three_pages(ak: AuthentikAPIDouble) -> None:
    ak.set_providers(providers(5))
    pages = {}
    for page in (1, 2, 3):
        status, body, _ = get(ak, f"/api/v3/outposts/proxy/?page={page}&page_size=2")
        assert status == 200
        validate("PaginatedProxyOutpostConfigList", body)
        pages[page] = body
    assert [p["pagination"] for p in pages.values()] == [
        {"next": 2, "previous": 0, "count": 5, "current": 1, "total_pages": 3, "start_index": 1, "end_index": 2},
        {"next": 3, "previous": 1, "count": 5, "current": 2, "total_pages": 3, "start_index": 3, "end_index": 4},
        {"next": 0, "previous": 2, "count": 5, "current": 3, "total_pages": 3, "start_index": 5, "end_index": 5},
    ]
    names = [r["name"] for p in pages.values() for r in p["results"]]
    assert names == ["app1", "app2", "app3", "app4", "app5"]  # ordered by name, like authentik

    # the outpost's loop: follow pagination.next until 0
    seen, page = [], 1
    while page:
        _, body, _ = get(ak, f"/api/v3/outposts/proxy/?page={page}&page_size=2")
        seen += [r["name"] for r in body["results"]]
        page = body["pagination"]["next"]
    assert seen == names

    status, body, _ = get(ak, "/api/v3/outposts/proxy/?page=4&page_size=2")
    assert status == 404 and body == {"detail": "Invalid page."}
    for bad in ("0", "-1", "abc", "1.0"):
        assert get(ak, f"/api/v3/outposts/proxy/?page={bad}&page_size=2")[:2] == (404, {"detail": "Invalid page."})
    _, body, _ = get(ak, "/api/v3/outposts/proxy/?page=last&page_size=2")
    assert body["pagination"]["current"] == 3
    for fallback in ("0", "-3", "x", ""):  # not a positive integer: the default page size (100)
        _, body, _ = get(ak, f"/api/v3/outposts/proxy/?page_size={fallback}")
        assert (body["pagination"]["total_pages"], [r["name"] for r in body["results"]]) == (1, names)


def test_pagination_of_an_empty_list_and_a_page_size_cap() -> None:
    with AuthentikAPIDouble(max_page_size=2) as ak:
        status, body, _ = get(ak, "/api/v3/outposts/proxy/")
        assert status == 200 and body["results"] == []
        assert body["pagination"] == {"next": 0, "previous": 0, "count": 0, "current": 1, "total_pages": 1,
                                      "start_index": 0, "end_index": 0}
        ak.set_providers(providers(5))
        _, body, _ = get(ak, "/api/v3/outposts/proxy/?page_size=100")
        assert ([r["name"] for r in body["results"]], body["pagination"]["total_pages"]) == (["app1", "app2"], 3)


def test_auth_is_required_like_authentik(ak: AuthentikAPIDouble) -> None:
    for path in ("/api/v3/outposts/instances/", "/api/v3/outposts/proxy/", "/api/v3/root/config/",
                 f"/api/v3/crypto/certificatekeypairs/{uuid.uuid4()}/"):
        status, body, _ = get(ak, path, token="wrong")
        assert (status, body) == (403, {"detail": "Token invalid/expired"}), path
        validate("GenericError", body)
    status, body, _ = get(ak, "/api/v3/outposts/proxy/", token=None)
    assert (status, body) == (403, {"detail": "Authentication credentials were not provided."})
    status, body, _ = get(ak, "/api/v3/outposts/proxy/", token=None, headers={"Authorization": "Basic eDp5"})
    assert (status, body) == (403, {"detail": "Unsupported authentication type"})
    # root/config allows anonymous callers (its OpenAPI security has `{}`), but not a wrong token
    assert get(ak, "/api/v3/root/config/", token=None)[0] == 200
    assert ak.count("/api/v3/outposts/proxy/") == 3


def test_down_and_broken_json(ak: AuthentikAPIDouble) -> None:
    ak.set_down(True)
    assert get(ak, "/api/v3/outposts/instances/")[0] == 503
    assert get(ak, "/api/v3/root/config/", token="wrong")[0] == 503
    with pytest.raises(InvalidStatus) as exc:
        connect(ak.ws_url(), additional_headers=ak.auth_header, open_timeout=5)
    assert exc.value.response.status_code == 503
    ak.set_down(False)
    assert get(ak, "/api/v3/outposts/instances/")[0] == 200
    ak.set_broken_json(True)
    status, body, _ = get(ak, "/api/v3/outposts/proxy/")
    assert status == 200 and isinstance(body, bytes)
    with pytest.raises(ValueError):
        json.loads(body)
    ak.set_broken_json(False)
    assert get(ak, "/api/v3/outposts/proxy/")[0] == 200


def test_a_bad_body_is_refused_and_reported(ak: AuthentikAPIDouble) -> None:
    ak.root_config["cache_timeout_flows"] = "300"
    status, body, _ = get(ak, "/api/v3/root/config/")
    assert status == 500 and "cache_timeout_flows" in body["error"]
    with pytest.raises(ContractViolation, match="cache_timeout_flows"):
        ak.check()
    ak.violations.clear()


def test_certificate_fetch_counters_and_rotation(ak: AuthentikAPIDouble) -> None:
    kp = str(uuid.uuid4())
    cert, key, fp = self_signed_certificate("a.example.test")
    ak.add_certificate(kp, cert, key, fp)
    for _ in range(3):
        get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/")
    get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/view_certificate/")
    assert ak.certificate_fetches(kp) == {"keypair": 3, "certificate": 1, "private_key": 0}
    cert2, key2, fp2 = self_signed_certificate("a.example.test")
    ak.add_certificate(kp, cert2, key2, fp2)
    _, body, _ = get(ak, f"/api/v3/crypto/certificatekeypairs/{kp}/")
    assert body["fingerprint_sha256"] == fp2 != fp and re.fullmatch(r"([0-9a-f]{2}:){31}[0-9a-f]{2}", fp2)
    ak.reset_counters()
    assert ak.certificate_fetches(kp) == {"keypair": 0, "certificate": 0, "private_key": 0}


def test_http_1_1_keep_alive(ak: AuthentikAPIDouble) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", ak.port, timeout=5)
    for path in ("/api/v3/root/config/", "/api/v3/outposts/instances/", "/api/v3/outposts/proxy/"):
        conn.request("GET", path, headers=ak.auth_header)
        resp = conn.getresponse()
        assert resp.version == 11 and resp.status == 200
        resp.read()
    conn.close()


# --- websocket -----------------------------------------------------------------------------------


def recv_json(ws: Any) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=5))


def test_websocket_hello_ack_and_pushes(ak: AuthentikAPIDouble) -> None:
    instance = str(uuid.uuid4())
    with connect(ak.ws_url(instance_uuid=instance, attempt=1), additional_headers=ak.auth_header,
                 user_agent_header="goauthentik.io/outpost/2025.12.4", open_timeout=5) as ws:
        ak.wait_for_connections(1)
        client = ak.ws_clients[0]
        assert client.query == {"instance_uuid": [instance], "attempt": ["1"]}
        assert client.headers["user-agent"] == "goauthentik.io/outpost/2025.12.4"

        ws.send(json.dumps({"instruction": HELLO, "args": HELLO_ARGS}))
        assert recv_json(ws) == {"instruction": ACK, "args": {}}
        assert ak.hellos == [HELLO_ARGS]
        ws.send(json.dumps({"instruction": ACK, "args": {}}))  # an ACK is not answered

        assert ak.send_trigger_update() == 1
        assert recv_json(ws) == {"instruction": TRIGGER_UPDATE, "args": {}}

        sid = hash_session_key("django-session-key")
        assert ak.send_session_end(sid) == 1
        assert recv_json(ws) == {"instruction": SESSION_END,
                                 "args": {"type": "event.session.end", "session_id": sid}}
        assert len(sid) == 64

        ws.send(json.dumps({"instruction": HELLO, "args": HELLO_ARGS}))
        assert recv_json(ws) == {"instruction": ACK, "args": {}}  # nothing else was queued
        ak.wait_for_hellos(2)

        assert ak.disconnect_all() == 1
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    ak.wait_for(lambda: ak.connected == 0 and client.closed, what="disconnect")  # closed is set by the server thread
    assert ak.send_trigger_update() == 0
    assert client.closed and [m["instruction"] for m in client.messages] == [HELLO, ACK, HELLO]


def test_websocket_abrupt_disconnect_and_reconnect(ak: AuthentikAPIDouble) -> None:
    with connect(ak.ws_url(attempt=1), additional_headers=ak.auth_header, open_timeout=5) as ws:
        ak.wait_for_connections(1)
        ak.disconnect_all(abrupt=True)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is None  # no close frame: the connection just dropped
    with connect(ak.ws_url(attempt=2), additional_headers=ak.auth_header, open_timeout=5) as ws2:
        ak.wait_for_connections(1)
        assert ak.send_trigger_update() == 1
        assert recv_json(ws2)["instruction"] == TRIGGER_UPDATE
    assert [c.query["attempt"] for c in ak.ws_clients] == [["1"], ["2"]]


@pytest.mark.parametrize("case", ["no token", "wrong token", "other outpost"])
def test_websocket_handshake_needs_the_token_and_own_outpost(ak: AuthentikAPIDouble, case: str) -> None:
    headers = {"no token": {}, "wrong token": {"Authorization": "Bearer nope"},
               "other outpost": ak.auth_header}[case]
    url = ak.ws_url(pk=str(uuid.uuid4())) if case == "other outpost" else ak.ws_url()
    with pytest.raises(InvalidStatus) as exc:
        connect(url, additional_headers=headers, open_timeout=5)
    assert exc.value.response.status_code == 403
    assert ak.connected == 0 and ak.ws_clients == []


def test_websocket_closes_on_a_malformed_message(ak: AuthentikAPIDouble) -> None:
    with connect(ak.ws_url(), additional_headers=ak.auth_header, open_timeout=5) as ws:
        ws.send("not json")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


def test_stop_drops_keep_alive_connections() -> None:
    ak = AuthentikAPIDouble().start()
    conn = http.client.HTTPConnection("127.0.0.1", ak.port, timeout=5)
    conn.request("GET", "/api/v3/root/config/", headers=ak.auth_header)
    conn.getresponse().read()
    ak.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/api/v3/root/config/", headers=ak.auth_header)
        conn.getresponse().read()
    conn.close()
