"""Sign-out that another site cannot trigger: which requests count as cross-site, and what they get."""

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from mitm_outpost.endpoints import sent_cross_site
from mitm_outpost.registry import Registry
from tests.unit.conftest import make_provider
from tests.unit.test_chain import flow, logged_in, run

APP = make_provider()  # https://app.example.test
DOMAIN = make_provider(name="domain", mode="forward_domain", external_host="https://auth.corp.test", internal_host="",
                       cookie_domain="corp.test", client_id="d")


def request(headers: dict[str, str]) -> http.Request:
    return tutils.treq(headers=http.Headers([(k.encode(), v.encode()) for k, v in headers.items()]))


@pytest.mark.parametrize(("headers", "foreign"), [
    ({}, None),
    ({"Sec-Fetch-Site": "same-origin"}, None),
    ({"Sec-Fetch-Site": "same-site"}, None),
    ({"Sec-Fetch-Site": "none"}, None),
    ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
    ({"Sec-Fetch-Site": "Cross-Site"}, "Sec-Fetch-Site"),
    ({"Sec-Fetch-Site": "whatever"}, "Sec-Fetch-Site"),
    ({"Sec-Fetch-Site": "same-origin", "Referer": "https://evil.test/"}, None),  # the browser's own word wins
    ({"Origin": "https://app.example.test"}, None),
    ({"Referer": "https://app.example.test/page?a=1"}, None),
    ({"Origin": "https://evil.test"}, "Origin"),
    ({"Origin": "null"}, "Origin"),  # an opaque origin: a sandboxed frame, a data: URL
    ({"Origin": "http://app.example.test"}, "Origin"),  # another scheme is another site
    ({"Origin": "https://app.example.test:8443"}, "Origin"),
    ({"Origin": "https://other.example.test"}, "Origin"),  # not domain level: only the provider's origin
    ({"Referer": "https://evil.test/?rd=https://app.example.test/"}, "Referer"),
    ({"Referer": "/relative"}, "Referer"),
    ({"Origin": "https://app.example.test", "Referer": "https://evil.test/"}, "Referer"),
])
def test_cross_site_for_one_application(headers: dict[str, str], foreign: str | None) -> None:
    assert sent_cross_site(request(headers), APP) == foreign


@pytest.mark.parametrize(("referer", "foreign"), [
    ("https://auth.corp.test/x", False),
    ("https://b.corp.test/x", False),  # inside the cookie domain: the same site
    ("https://corp.test/", False),
    ("https://b.corp.test:8443/", False),
    ("https://evilcorp.test/", True),
    ("https://corp.test.evil.test/", True),
    ("http://b.corp.test/", True),
])
def test_cross_site_at_domain_level(referer: str, foreign: bool) -> None:
    assert (sent_cross_site(request({"Referer": referer}), DOMAIN) is not None) is foreign


async def test_a_cross_site_sign_out_is_asked_to_confirm(registry: Registry) -> None:
    cookie = await logged_in(registry)
    for path in ("/outpost.goauthentik.io/sign_out", "/akprox/sign_out"):
        for method in ("GET", "POST"):
            f = flow(path, headers={"Cookie": cookie, "Sec-Fetch-Site": "cross-site"})
            f.request.method = method
            await run(registry, f)
            assert f.response.status_code == 200 and f.response.headers["Cache-Control"] == "no-store"
            assert f'<form method="post" action="{path}">' in f.response.text
            assert "frame-ancestors 'none'" in f.response.headers["Content-Security-Policy"]
            assert "Set-Cookie" not in f.response.headers
            assert f.metadata["outpost"]["code"] == "sign_out_confirm"
    assert await registry.store.get("app", "sid-1") is not None


async def test_the_confirmed_post_signs_out(registry: Registry) -> None:
    cookie = await logged_in(registry)
    f = flow("/outpost.goauthentik.io/sign_out", headers={"Cookie": cookie, "Origin": "https://app.example.test"})
    f.request.method = "POST"
    await run(registry, f)
    assert f.response.status_code == 303
    assert f.response.headers["Location"].startswith("https://idp.example.test/logout?")
    assert f.metadata["outpost"]["code"] == "sign_out"
    assert await registry.store.get("app", "sid-1") is None
