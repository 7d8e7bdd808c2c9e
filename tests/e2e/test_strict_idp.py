"""The outpost against panva's certified oidc-provider: PKCE required, RS256, keys rotated mid-test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from tests.support.panva import PanvaOP, login, make_rsa_jwk
from tests.support.processes import Outpost, provider_entry

ACCOUNTS = {
    "alice": {"email": "alice@example.test", "name": "Alice", "preferred_username": "alice",
              "groups": ["admins", "users"], "entitlements": ["billing"]},
}


@pytest.fixture(scope="module")
def setup(upstream: str) -> Iterator[tuple[PanvaOP, Outpost, list[dict[str, Any]]]]:
    port = free_port()
    keys = [make_rsa_jwk("k1"), make_rsa_jwk("k2")]
    client = {"client_id": "strict-client", "client_secret": "strict-secret",
              "redirect_uris": [f"http://127.0.0.1:{port}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"],
              "token_endpoint_auth_method": "client_secret_basic"}
    with PanvaOP([client], ACCOUNTS, [keys[0]]) as op:
        entry = provider_entry("strict", port, upstream, op.issuer, client_id="strict-client",
                               client_secret="strict-secret",
                               scopes_to_request=["openid", "profile", "email", "groups", "entitlements"])
        with Outpost([entry], port) as outpost:
            yield op, outpost, keys


def _log_in(outpost: Outpost) -> tuple[Any, dict[str, list[str]]]:
    client = browser()
    start = client.get(f"{outpost.url}/headers")
    authorize = client.get(start.headers["location"])
    callback = login(client, authorize.headers["location"], "alice")
    done = client.get(callback)
    assert done.status_code == 302, done.text
    seen: dict[str, list[str]] = {}
    for name, value in client.get(f"{outpost.url}/headers").json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return client, seen


def test_login_with_rs256_and_key_rotation(setup: tuple[PanvaOP, Outpost, list[dict[str, Any]]]) -> None:
    op, outpost, keys = setup
    before, seen = _log_in(outpost)
    assert seen["x-authentik-username"] == ["alice"]
    assert seen["x-authentik-groups"] == ["admins|users"]
    assert seen["x-authentik-entitlements"] == ["billing"]
    assert jwt.get_unverified_header(seen["x-authentik-jwt"][0])["kid"] == "k1"

    op.rotate_keys([keys[1], keys[0]])  # the IdP now signs with k2, which the outpost has not seen
    _, seen = _log_in(outpost)
    assert seen["x-authentik-username"] == ["alice"]
    assert jwt.get_unverified_header(seen["x-authentik-jwt"][0])["kid"] == "k2"
    assert before.get(f"{outpost.url}/headers").status_code == 200  # sessions outlive a key rotation
    assert "fetched JWKS" in outpost.output
