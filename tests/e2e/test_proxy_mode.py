"""Proxy mode end to end: real mitmdump with our addons, the dev IdP, the demo upstream."""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Iterator

import httpx2
import jwt
import pytest

from mitm_outpost import names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost, provider_entry

SPOOFS = {
    "X-authentik-username": "evil",
    "x-AUTHENTIK-groups": "admins",
    "X_Authentik_Email": "evil@example.test",
    "x_authentik_uid": "0",
    "X-Authentik_Name": "Evil",
    "X-authentik-jwt": "forged",
    "X-authentik-meta-provider": "forged",
    "X-Auth-Username": "evil",
    "X_Forwarded_User": "evil",
    "X-Forwarded-Email": "evil@example.test",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "gopher",
}
SKIP_RULE = "^/headers/public$"


@pytest.fixture(scope="module")
def outpost(idp: str, upstream: str) -> Iterator[Outpost]:
    port = free_port()
    entry = provider_entry("app", port, upstream, idp, skip_path_regex=f"{SKIP_RULE}\n", access_token_validity=600)
    with Outpost([entry], port) as process:
        yield process


def received(response: httpx2.Response) -> dict[str, list[str]]:
    """The headers the upstream saw, by lower-case name."""
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


def logged_in(outpost: Outpost, user: str = "alice") -> httpx2.Client:
    client = browser()
    done = mock_login(client, f"{outpost.url}/headers", user)
    assert done.status_code == 302 and done.headers["location"] == f"{outpost.url}/headers"
    return client


def test_login_round_trip_sends_identity_headers(outpost: Outpost) -> None:
    client = browser()
    first = client.get(f"{outpost.url}/private/page?x=1&y=%2F")
    assert first.status_code == 302
    location = first.headers["location"]
    assert location.startswith(f"{outpost.url}/outpost.goauthentik.io/start?rd=")
    authorize = client.get(location)
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize.headers["location"]).query)
    assert params["redirect_uri"] == [f"{outpost.url}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"]
    assert params["code_challenge_method"] == ["S256"] and params["nonce"] and params["state"]
    assert set(params["scope"][0].split()) == {"openid", "profile", "email"}
    form = client.post(authorize.headers["location"], data={"sub": "alice"})
    done = client.get(form.headers["location"])
    assert done.headers["location"] == f"{outpost.url}/private/page?x=1&y=%2F"
    session_cookie = next(c for c in done.headers.get_list("set-cookie")
                          if c.startswith(names.cookie_name("app-client") + "="))
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie and "Path=/" in session_cookie
    assert "Secure" not in session_cookie  # external host is plain http
    assert "Max-Age=600" in session_cookie

    client.cookies.set("theme", "dark")
    proxied = client.get(f"{outpost.url}/headers")
    assert proxied.headers["x-powered-by"] == "goauthentik.io"  # as authentik's outpost answers
    seen = received(proxied)
    assert seen["x-authentik-username"] == ["alice"]
    assert seen["x-authentik-groups"] == ["admins|users"]
    assert seen["x-authentik-entitlements"] == ["app-admin"]
    assert seen["x-authentik-email"] == ["alice@example.test"]
    assert seen["x-authentik-name"] == ["Alice Admin"]
    assert seen["x-authentik-uid"] == ["alice"]
    assert jwt.decode(seen["x-authentik-jwt"][0], options={"verify_signature": False})["sub"] == "alice"
    assert seen["x-authentik-meta-provider"] == ["app"] and seen["x-authentik-meta-outpost"] == ["test-outpost"]
    assert (seen["x-authentik-meta-app"] == ["app"]
            and seen["x-authentik-meta-version"][0].startswith("goauthentik.io/outpost/"))
    assert seen["x-authentik-meta-jwks"][0].endswith("/jwks")
    for legacy, value in {"x-auth-username": "alice", "x-auth-groups": "admins|users",
                          "x-forwarded-email": "alice@example.test", "x-forwarded-preferred-username": "alice",
                          "x-forwarded-user": "alice"}.items():
        assert seen[legacy] == [value]
    assert seen["host"] == [f"127.0.0.1:{outpost.http_port}"]  # the client's Host, as authentik sends it (seed 001)
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{outpost.http_port}"]
    assert seen["x-forwarded-proto"] == ["http"] and seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["cookie"] == ["theme=dark"]  # the outpost's cookies never reach the app


@pytest.mark.parametrize("path", ["/headers", "/headers/public"])
def test_spoofed_identity_headers_never_reach_the_upstream(outpost: Outpost, path: str) -> None:
    client = logged_in(outpost) if path == "/headers" else browser()
    response = client.get(f"{outpost.url}{path}", headers=SPOOFS)
    assert response.status_code == 200
    seen = received(response)
    values = [v for vs in seen.values() for v in vs]
    assert not ({"evil", "admins", "evil@example.test", "forged", "6.6.6.6", "evil.example", "gopher", "0", "Evil"}
                & set(values))
    assert not [k for k in seen if "_" in k]
    if path == "/headers/public":  # let through by a rule: no identity at all
        assert not [k for k in seen if k.startswith("x-authentik-")]


def test_unauthenticated_api_clients_get_401(outpost: Outpost) -> None:
    for headers in ({"X-Requested-With": "XMLHttpRequest"}, {"Accept": "application/json"}):
        response = httpx2.get(f"{outpost.url}/private", headers=headers)
        assert response.status_code == 401


def test_authorization_header_gets_401_not_a_redirect(outpost: Outpost) -> None:
    response = browser().get(f"{outpost.url}/private", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and "Receive header authentication" in response.text


def test_ping_answers_any_host_and_unknown_hosts_get_400(outpost: Outpost) -> None:
    assert httpx2.get(f"{outpost.url}/outpost.goauthentik.io/ping",
                      headers={"Host": "whatever.example"}).status_code == 204
    unknown = httpx2.get(f"{outpost.url}/", headers={"Host": "other.example"})
    assert unknown.status_code == 400
    assert unknown.json()["host"] == "other.example"


def _start_login(outpost: Outpost, client: httpx2.Client) -> tuple[str, str]:
    """Run a login up to the IdP's answer; returns the callback URL with code and state."""
    start = client.get(f"{outpost.url}/outpost.goauthentik.io/start?rd=/headers")
    form = client.post(start.headers["location"], data={"sub": "alice"})
    callback = form.headers["location"]
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["state"][0]
    return callback, state


def test_replayed_state_is_refused(outpost: Outpost) -> None:
    client = browser()
    callback, _ = _start_login(outpost, client)
    assert client.get(callback).status_code == 302
    replay = client.get(callback)
    assert replay.status_code == 400 and "already used" in replay.text


def test_state_from_another_browser_is_refused(outpost: Outpost) -> None:
    callback, _ = _start_login(outpost, browser())
    other = browser()
    other.get(f"{outpost.url}/outpost.goauthentik.io/start")  # has its own pre-login cookie
    response = other.get(callback)
    assert response.status_code == 400 and "another browser" in response.text
    assert not [c for c in response.headers.get_list("set-cookie")
                if c.startswith(names.cookie_name("app-client") + "=")]


def test_tampered_and_expired_state_are_refused(outpost: Outpost) -> None:
    client = browser()
    callback, state = _start_login(outpost, client)
    header, payload, signature = state.split(".")
    tampered = callback.replace(state, f"{header}.{payload}.{signature[:-2]}AA")
    assert client.get(tampered).status_code == 400
    claims = jwt.decode(state, options={"verify_signature": False})
    key = __import__("mitm_outpost.provider", fromlist=["_state_key"])._state_key(
        {"name": "app", "cookie_secret": "", "client_secret": "app-secret"})
    expired = jwt.encode({**claims, "exp": int(time.time()) - 5}, key, algorithm="HS256")
    response = client.get(callback.replace(state, expired))
    assert response.status_code == 400 and "expired" in response.text
    assert client.get(callback.replace(state, "not-a-jwt")).status_code == 400
    # The genuine state still works once: refusals did not consume it.
    assert client.get(callback).status_code == 302


FOREIGN_RD = [
    "https://evil.com/", "//evil.com", "///evil.com", "/\\evil.com", "\\\\evil.com", "/%5Cevil.com", "https:evil.com",
    "http://127.0.0.1:{port}@evil.com/", "https://evil.com\\@127.0.0.1:{port}/", "http://127.0.0.1:{port}.evil.com/",
    "javascript:alert(1)", "data:text/html,x", "/\t/evil.com", "/\r\nSet-Cookie: x=1", "http://127.0.0.2:{port}/",
    "https://127.0.0.1:{port}/",
]


@pytest.mark.parametrize("rd", FOREIGN_RD)
def test_foreign_rd_ends_on_the_external_host(outpost: Outpost, rd: str) -> None:
    client = browser()
    rd = rd.format(port=outpost.http_port)
    start = client.get(f"{outpost.url}/outpost.goauthentik.io/start", params={"rd": rd})
    assert start.status_code == 302
    form = client.post(start.headers["location"], data={"sub": "alice"})
    done = client.get(form.headers["location"])
    assert done.headers["location"] == f"{outpost.url}/"


def test_relative_and_own_rd_are_kept(outpost: Outpost) -> None:
    for rd, expected in (("/a/b?c=d", f"{outpost.url}/a/b?c=d"), (f"{outpost.url}/x", f"{outpost.url}/x")):
        client = browser()
        start = client.get(f"{outpost.url}/outpost.goauthentik.io/start", params={"rd": rd})
        form = client.post(start.headers["location"], data={"sub": "alice"})
        assert client.get(form.headers["location"]).headers["location"] == expected


def test_tampered_cookie_is_cleared_and_sent_to_login(outpost: Outpost) -> None:
    client = logged_in(outpost)
    name = names.cookie_name("app-client")
    genuine = client.cookies[name]
    for forged in (genuine[:-1] + ("A" if genuine[-1] != "A" else "B"), genuine.swapcase(), "garbage", "", "x" * 5000):
        response = browser().get(f"{outpost.url}/headers", headers={"Cookie": f"{name}={forged}"})
        assert response.status_code == 302, forged
        if forged:
            assert any(c.startswith(f"{name}=;") and "Max-Age=0" in c for c in response.headers.get_list("set-cookie"))


def test_session_id_is_fresh_at_every_login(outpost: Outpost) -> None:
    name = names.cookie_name("app-client")
    planted = "attacker-chosen-id-" + "x" * 24
    client = browser()
    client.cookies.set(name, planted, domain="127.0.0.1")
    done = mock_login(client, f"{outpost.url}/headers")
    issued = [c for c in done.headers.get_list("set-cookie") if c.startswith(f"{name}=")]
    assert len(issued) == 1 and not issued[0].startswith(f"{name}={planted}")
    assert browser(headers={"Cookie": f"{name}={planted}"}).get(f"{outpost.url}/headers").status_code == 302


def test_sign_out_ends_every_session_of_the_user(outpost: Outpost) -> None:
    first, second, other_user = logged_in(outpost), logged_in(outpost), logged_in(outpost, "bob")
    for client in (first, second, other_user):
        assert client.get(f"{outpost.url}/headers").status_code == 200
    out = first.get(f"{outpost.url}/outpost.goauthentik.io/sign_out")
    assert out.status_code == 302
    end_session = urllib.parse.urlsplit(out.headers["location"])
    assert end_session.path.endswith("/end_session")
    assert "id_token_hint" in urllib.parse.parse_qs(end_session.query)
    assert any("Max-Age=0" in c for c in out.headers.get_list("set-cookie"))
    assert first.get(f"{outpost.url}/headers").status_code == 302
    assert second.get(f"{outpost.url}/headers").status_code == 302
    assert other_user.get(f"{outpost.url}/headers").status_code == 200


def test_legacy_prefix_endpoints(outpost: Outpost) -> None:
    assert httpx2.get(f"{outpost.url}/akprox/ping").status_code == 204
    start = browser().get(f"{outpost.url}/akprox/start?rd=/x")
    assert start.status_code == 302 and "/authorize" in start.headers["location"]
    # A login started under the old prefix comes back under it (configs of that era route only /akprox).
    assert "redirect_uri=" + urllib.parse.quote(f"{outpost.url}/akprox/callback", safe="") in start.headers["location"]


def test_flows_record_their_decision(outpost: Outpost) -> None:
    """The log line written for each decision names the outcome and the reason."""
    browser().get(f"{outpost.url}/private")
    logged_in(outpost)
    log = outpost.output
    assert re.search(r"callback: signed in as alice", log)


def test_upstream_host_internal_and_no_powered_by(idp: str, upstream: str) -> None:
    """For apps that need internal_host's own Host (not an authentik field), and the option for X-Powered-By."""
    port = free_port()
    entry = provider_entry("internal", port, upstream, idp, upstream_host="internal")
    with Outpost([entry], port, extra=["--set", "outpost_powered_by=false"]) as outpost:
        client = logged_in(outpost)
        response = client.get(f"{outpost.url}/headers")
        seen = received(response)
        assert seen["host"] == [upstream.removeprefix("http://")] and seen["x-forwarded-host"] == [f"127.0.0.1:{port}"]
        assert "x-powered-by" not in response.headers
