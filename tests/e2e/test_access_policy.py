"""Access policy in proxy mode: skip rules, ak_proxy claims, additional headers, Basic upstream."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx2
import pytest

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost, provider_entry, whoami

RULES = "^/headers/public$\r\n\n^/headers/open/\n"


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[str]:
    port = free_port()
    with whoami(port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def outpost(idp: str, upstream: str) -> Iterator[Outpost]:
    port = free_port()
    entry = provider_entry("policy", port, upstream, idp, skip_path_regex=RULES, basic_auth_enabled=True,
                           basic_auth_user_attribute="app_user", basic_auth_password_attribute="app_password")
    with Outpost([entry], port) as process:
        yield process


def user(idp: str, sub: str, **claims: object) -> str:
    """Define a user at the dev IdP, with the claims an authentik scope mapping would add."""
    response = httpx2.put(f"{idp}/users/{sub}",
                          json={"preferred_username": sub, "email": f"{sub}@example.test", **claims})
    assert response.status_code == 204
    return sub


def seen_by_app(outpost: Outpost, sub: str, path: str = "/headers",
                **kwargs: object) -> tuple[int, dict[str, list[str]]]:
    client = browser()
    mock_login(client, f"{outpost.url}/headers", sub)
    response = client.get(f"{outpost.url}{path}", **kwargs)
    if response.status_code != 200:
        return response.status_code, {}
    seen: dict[str, list[str]] = {"served-by-port": [str(response.json()["port"])]}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return 200, seen


@pytest.mark.parametrize("path, expected", [
    ("/headers/public", "skip"), ("/headers/public?x=https://other.test", "skip"), ("/headers/open/x", "skip"),
    ("/headers/public/../../headers", "login"), ("/headers/open/..%2F..%2Fheaders", "login"),
    ("/HEADERS/PUBLIC", "login"), ("/headers/open;/../headers", "login"), ("/x/headers/public", "login"),
    # Not in normal form: sent to the normal form, the only one the rules judge and the app receives.
    ("/headers/open/%2e%2e/%2e%2e/headers", "/headers"), ("/headers//public", "/headers/public"),
    ("/headers/%6Fpen/x?q=1", "/headers/open/x?q=1"),
])
def test_unauthenticated_paths(outpost: Outpost, path: str, expected: str) -> None:
    response = browser().get(f"{outpost.url}{path}", headers={"X-authentik-username": "evil"})
    if expected == "skip":
        assert response.status_code == 200, response.text[:200]
        assert "evil" not in response.text and "x-authentik" not in response.text.lower()
    elif expected == "login":
        assert response.status_code == 302, (path, response.status_code)
    else:
        assert (response.status_code, response.headers["location"]) == (308, expected)


def test_skipped_path_with_a_session_gets_identity(outpost: Outpost, idp: str) -> None:
    status, seen = seen_by_app(outpost, user(idp, "sam"), "/headers/public")
    assert status == 200 and seen["x-authentik-username"] == ["sam"]


def test_backend_override_and_host_header(outpost: Outpost, idp: str, second_upstream: str) -> None:
    sub = user(idp, "carol",
               ak_proxy={"backend_override": f"{second_upstream}/ignored/path", "host_header": "internal.carol"})
    status, seen = seen_by_app(outpost, sub)
    assert status == 200 and seen["host"] == ["internal.carol"]
    assert seen["x-authentik-username"] == ["carol"]
    assert seen["served-by-port"] == [second_upstream.rsplit(":", 1)[1]]
    status, plain = seen_by_app(outpost, user(idp, "dave", ak_proxy={"host_header": "only-the-host.test"}))
    assert status == 200 and plain["host"] == ["only-the-host.test"]
    assert plain["served-by-port"] != [second_upstream.rsplit(":", 1)[1]]


@pytest.mark.parametrize("claims", [
    {"backend_override": "ftp://files.test/"}, {"backend_override": "not a url"}, {"backend_override": 42},
    {"backend_override": "http://user:pw@backend.test/"}, {"host_header": "evil.test\r\nX-Injected: 1"},
    {"host_header": ["list"]},
])
def test_malformed_ak_proxy_claims_deny_with_502(outpost: Outpost, idp: str, claims: dict[str, object]) -> None:
    status, _ = seen_by_app(outpost, user(idp, "erin", ak_proxy=claims))
    assert status == 502
    assert "their requests will be refused" in outpost.output


def test_additional_headers_cannot_replace_identity(outpost: Outpost, idp: str) -> None:
    extra = {"X-Team": "blue", "X-Count": 3, "X-authentik-username": "root", "X_Team": "alias", "Host": "evil.test",
             "Connection": "close", "Authorization": "Bearer forged", "Bad Name": "x", "X-Newline": "a\nb"}
    sub = user(idp, "frank", ak_proxy={"user_attributes": {"additionalHeaders": extra, "app_user": "frank-app",
                                                           "app_password": "s3cret"}})
    status, seen = seen_by_app(outpost, sub, headers={"X-Team": "client-chosen"})
    assert status == 200
    assert seen["x-team"] == ["blue"] and seen["x-count"] == ["3"]
    assert seen["x-authentik-username"] == ["frank"]
    assert "x_team" not in seen and "x-newline" not in seen and "bad name" not in seen
    assert seen["host"][0].startswith("127.0.0.1:")
    assert seen["authorization"] == ["Basic " + base64.b64encode(b"frank-app:s3cret").decode()]


def test_basic_upstream_without_a_password_sends_nothing(outpost: Outpost, idp: str) -> None:
    sub = user(idp, "gina", ak_proxy={"user_attributes": {"app_user": "gina"}})
    status, seen = seen_by_app(outpost, sub, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert status == 200 and "authorization" not in seen
    assert "no HTTP Basic credentials for the upstream" in outpost.output
