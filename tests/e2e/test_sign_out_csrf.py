"""Sign-out that another site cannot trigger, end to end: real mitmdump with our addons and the dev IdP.

SameSite=Lax sends the session cookie on a top-level navigation from any site, and sign-out ends
every session of the user. A sign-out another site sent (Sec-Fetch-Site: cross-site; without it,
an Origin or Referer of another site) gets a confirmation page whose POST form signs out.
"""

from __future__ import annotations

import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from mitm_outpost import names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.e2e.test_forward_auth import DOMAIN, Setup, login
from tests.e2e.test_forward_auth import browser as domain_browser
from tests.support.browser import chromium, chromium_or_skip, new_page, stored_cookies
from tests.support.processes import RUNNERS, Outpost, provider_entry
from tests.support.proxies import proxy_for, require_or_skip, standard_values

SIGN_OUT = "/outpost.goauthentik.io/sign_out"
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def outpost(idp: str, upstream: str) -> Iterator[Outpost]:
    port = free_port()
    with Outpost([provider_entry("app", port, upstream, idp)], port) as process:
        yield process


def logged_in(outpost: Outpost) -> httpx2.Client:
    client = browser()
    assert mock_login(client, f"{outpost.url}/headers").status_code == 302
    assert client.get(f"{outpost.url}/headers").status_code == 200
    return client


def assert_confirmation(response: httpx2.Response, action: str = SIGN_OUT) -> None:
    """The confirmation page: 200, not stored, loads nothing, a POST form to the sign_out path, no cookie cleared."""
    assert response.status_code == 200, (response.status_code, response.headers)
    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert f'<form method="post" action="{action}">' in response.text
    assert all(url.startswith("/") and not url.startswith("//")
               for url in re.findall(r'(?:href|src|action)="([^"]*)"', response.text))
    assert "set-cookie" not in response.headers


def assert_signed_out(client: httpx2.Client, response: httpx2.Response, url: str, status: int = 302) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert urllib.parse.urlsplit(response.headers["location"]).path.endswith("/end_session")
    assert any("Max-Age=0" in c for c in response.headers.get_list("set-cookie"))
    assert client.get(url).status_code == 302  # back to login


@pytest.mark.parametrize("path", [SIGN_OUT, "/akprox/sign_out"])
def test_cross_site_navigation_gets_a_confirmation_and_keeps_the_session(outpost: Outpost, path: str) -> None:
    client = logged_in(outpost)
    response = client.get(f"{outpost.url}{path}", headers={"Sec-Fetch-Site": "cross-site", "Referer": f"{EVIL}/"})
    assert_confirmation(response, path)
    assert client.get(f"{outpost.url}/headers").status_code == 200
    assert "sign_out_confirm" in outpost.output


@pytest.mark.parametrize("headers", [
    {"Referer": f"{EVIL}/page"},
    {"Origin": EVIL},
    {"Origin": "null"},
    {"Referer": "http://localhost/"},  # the same machine, another site
])
def test_a_foreign_origin_or_referer_without_sec_fetch_site_gets_a_confirmation(
        outpost: Outpost, headers: dict[str, str]) -> None:
    client = logged_in(outpost)
    assert_confirmation(client.get(f"{outpost.url}{SIGN_OUT}", headers=headers))
    assert client.get(f"{outpost.url}/headers").status_code == 200


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-origin", "Referer": "{url}/headers"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "none"},  # typed or bookmarked
    {"Referer": "{url}/headers"},
    {},  # curl, old clients
])
def test_own_site_navigation_or_no_headers_signs_out(outpost: Outpost, headers: dict[str, str]) -> None:
    client = logged_in(outpost)
    sent = {name: value.format(url=outpost.url) for name, value in headers.items()}
    assert_signed_out(client, client.get(f"{outpost.url}{SIGN_OUT}", headers=sent), f"{outpost.url}/headers")


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-origin", "Origin": "{url}"},
    {"Origin": "{url}"},  # an older browser: no Sec-Fetch-Site
])
def test_the_confirmation_form_signs_out(outpost: Outpost, headers: dict[str, str]) -> None:
    client = logged_in(outpost)
    page = client.get(f"{outpost.url}{SIGN_OUT}", headers={"Sec-Fetch-Site": "cross-site"})
    action = re.search(r'<form method="post" action="([^"]+)">', page.text)
    assert action is not None
    sent = {name: value.format(url=outpost.url) for name, value in headers.items()}
    response = client.post(f"{outpost.url}{action.group(1)}", headers=sent)  # a form without fields: empty body
    assert_signed_out(client, response, f"{outpost.url}/headers", status=303)


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site", "Origin": EVIL}, {"Origin": EVIL}])
def test_a_cross_site_post_gets_the_confirmation_not_a_sign_out(outpost: Outpost, headers: dict[str, str]) -> None:
    client = logged_in(outpost)
    response = client.post(f"{outpost.url}{SIGN_OUT}", headers=headers, data={"confirm": "yes", "pad": "x" * 4096})
    assert_confirmation(response)
    assert client.get(f"{outpost.url}/headers").status_code == 200


@pytest.fixture(scope="module", params=RUNNERS, ids=[f"nginx-domain.conf-{tool}" for tool in RUNNERS])
def nginx_domain(request: pytest.FixtureRequest, idp: str, upstream: str) -> Iterator[Setup]:
    """Domain level behind nginx with docs/forward-auth/nginx-domain.conf: sign-out on any app host."""
    require_or_skip("nginx")
    proxy_port, outpost_port = free_port(), free_port()
    entry = {"name": "csrf-domain", "client_id": "csrf-domain", "client_secret": "csrf-secret", "issuer": idp,
             "mode": "forward_domain", "external_host": f"http://auth.{DOMAIN}:{proxy_port}", "cookie_domain": DOMAIN}
    up = urllib.parse.urlsplit(upstream)
    values = standard_values(port=proxy_port, outpost=("127.0.0.1", outpost_port), upstream=(up.hostname, up.port),
                             domain=DOMAIN, cookie_name=names.cookie_name("csrf-domain"))
    with Outpost([entry], outpost_port, tool=request.param) as outpost:
        with proxy_for("nginx-domain.conf", tempfile.mkdtemp(prefix="csrf-nginx-"), values) as proxy:
            yield Setup("nginx-domain.conf", "domain", proxy, outpost, idp)


def test_domain_level_hosts_of_the_cookie_domain_are_the_same_site(nginx_domain: Setup) -> None:
    setup = nginx_domain
    client = domain_browser()
    login(client, setup, setup.url("a", "/headers"))
    for foreign in (f"http://evil{DOMAIN}:{setup.port}/", f"http://{DOMAIN}.evil.test:{setup.port}/"):
        assert_confirmation(client.get(setup.url("b", SIGN_OUT), headers={"Referer": foreign}))
        assert client.get(setup.url("b", "/headers")).status_code == 200
    out = client.get(setup.url("b", SIGN_OUT), headers={"Referer": setup.url("a", "/headers")})
    assert out.status_code == 302 and "end_session" in out.headers["location"]
    for host in ("a", "b"):
        assert client.get(setup.url(host, "/headers")).status_code == 302


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[Any]:
    with chromium(chromium_or_skip()) as instance:
        yield instance


def test_chromium_link_from_another_site_asks_and_the_button_signs_out(
        chromium_browser: Any, outpost: Outpost, idp: str) -> None:
    """Chromium itself sets Sec-Fetch-Site and Origin: a link on another site's page gets the
    confirmation (the session survives), and its button signs out."""
    page = new_page(chromium_browser)
    cookie = names.cookie_name("app-client")
    try:
        page.goto(f"{outpost.url}/headers")
        page.wait_for_url(re.compile("^" + re.escape(idp) + "/"))
        page.locator("button[name=sub][value=alice]").click()
        page.wait_for_url(f"{outpost.url}/headers")
        page.route(f"{EVIL}/", lambda route: route.fulfill(
            content_type="text/html", body=f'<a href="{outpost.url}{SIGN_OUT}">sign out</a>'))
        page.goto(f"{EVIL}/")
        page.get_by_role("link", name="sign out").click()
        page.get_by_role("heading", name="Sign out?").wait_for()
        assert cookie in stored_cookies(page, outpost.url)
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(re.compile("^" + re.escape(idp) + "/"))
        assert cookie not in stored_cookies(page, outpost.url)
    finally:
        page.context.close()
