"""Proves the panva OP harness on its own, before the outpost is put in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx2 as httpx
import jwt
import pytest
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tests.support.panva import PanvaOP, login, make_rsa_jwk

CLIENT_ID, CLIENT_SECRET = "outpost", "outpost-secret"
REDIRECT_URI = "http://127.0.0.1:19999/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
ACCOUNTS = {
    "alice": {"email": "alice@example.test", "name": "Alice", "preferred_username": "alice",
              "groups": ["admins", "users"], "entitlements": ["billing"]},
}


@pytest.fixture(scope="module")
def keys() -> list[dict[str, Any]]:
    return [make_rsa_jwk("k1"), make_rsa_jwk("k2")]


@pytest.fixture
def op(keys: list[dict[str, Any]]) -> Iterator[PanvaOP]:
    client = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [REDIRECT_URI],
              "post_logout_redirect_uris": ["http://127.0.0.1:19999/"],
              "token_endpoint_auth_method": "client_secret_basic"}
    with PanvaOP([client], ACCOUNTS, [keys[0]]) as running:
        yield running


def authorize_url(meta: dict[str, Any], *, pkce: bool = True) -> tuple[str, str, str, str]:
    """Return (url, state, nonce, verifier) for an authorization code request."""
    state, nonce, verifier = generate_token(20), generate_token(20), generate_token(48)
    params = {"client_id": CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI,
              "scope": "openid profile email groups entitlements", "state": state, "nonce": nonce}
    if pkce:
        params |= {"code_challenge": create_s256_code_challenge(verifier), "code_challenge_method": "S256"}
    return f"{meta['authorization_endpoint']}?{urlencode(params)}", state, nonce, verifier


def login_and_verify(op: PanvaOP, meta: dict[str, Any]) -> dict[str, Any]:
    """Full code flow with a fresh browser; returns the verified ID token header + claims."""
    url, state, nonce, verifier = authorize_url(meta)
    with httpx.Client(follow_redirects=False) as browser:
        final = login(browser, url, "alice")
    assert final.startswith("http://127.0.0.1:19999/outpost.goauthentik.io/callback?")
    query = parse_qs(urlsplit(final).query)
    assert query["X-authentik-auth-callback"] == ["true"]  # registered query is kept
    assert query["state"] == [state] and query["iss"] == [op.issuer] and query["code"]

    tokens = httpx.post(meta["token_endpoint"], auth=(CLIENT_ID, CLIENT_SECRET), data={
        "grant_type": "authorization_code", "code": query["code"][0],
        "redirect_uri": REDIRECT_URI, "code_verifier": verifier}).raise_for_status().json()
    id_token = tokens["id_token"]
    signing_key = jwt.PyJWKClient(meta["jwks_uri"]).get_signing_key_from_jwt(id_token)
    claims = jwt.decode(id_token, signing_key, algorithms=["RS256"], audience=CLIENT_ID, issuer=op.issuer)
    assert claims["nonce"] == nonce and claims["sub"] == "alice"
    assert claims["groups"] == ["admins", "users"] and claims["entitlements"] == ["billing"]
    assert claims["email"] == "alice@example.test"

    intro = httpx.post(meta["introspection_endpoint"], auth=(CLIENT_ID, CLIENT_SECRET),
                       data={"token": tokens["access_token"]}).json()
    assert intro["active"] is True and intro["sub"] == "alice"
    return {"header": jwt.get_unverified_header(id_token), "claims": claims, "id_token": id_token}


def test_panva_harness(op: PanvaOP, keys: list[dict[str, Any]]) -> None:
    meta = httpx.get(f"{op.issuer}/.well-known/openid-configuration").json()
    assert meta["issuer"] == op.issuer
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["end_session_endpoint"] and meta["backchannel_logout_supported"] is True
    assert "client_credentials" in meta["grant_types_supported"]

    first = login_and_verify(op, meta)
    assert first["header"]["kid"] == "k1"

    # PKCE is required even for this confidential client: the error goes back to the RP.
    url, state, _, _ = authorize_url(meta, pkce=False)
    with httpx.Client(follow_redirects=False) as browser:
        refused = login(browser, url, "alice")
    query = parse_qs(urlsplit(refused).query)
    assert query["error"] == ["invalid_request"] and "code" not in query and query["state"] == [state]
    assert "PKCE" in query["error_description"][0]

    # Unknown accounts cannot log in.
    with httpx.Client(follow_redirects=False) as browser, pytest.raises(RuntimeError, match="mallory"):
        login(browser, authorize_url(meta)[0], "mallory")

    # The registered client_secret_basic is enforced (plain oidc-provider would accept _post too).
    denied = httpx.post(meta["token_endpoint"], data={"grant_type": "client_credentials",
                                                      "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    assert denied.status_code == 401 and denied.json()["error"] == "invalid_client"

    # client_credentials works for the confidential client.
    cc = httpx.post(meta["token_endpoint"], auth=(CLIENT_ID, CLIENT_SECRET),
                    data={"grant_type": "client_credentials"}).raise_for_status().json()
    assert cc["token_type"] == "Bearer" and cc["access_token"]

    old_jwks = httpx.get(meta["jwks_uri"]).json()
    port = op.port
    op.rotate_keys([keys[1], keys[0]])
    assert op.port == port
    new_jwks = httpx.get(meta["jwks_uri"]).json()
    assert [k["kid"] for k in old_jwks["keys"]] == ["k1"]
    assert [k["kid"] for k in new_jwks["keys"]] == ["k2", "k1"]
    assert all("d" not in k for k in new_jwks["keys"])  # only public parts are published
    assert login_and_verify(op, meta)["header"]["kid"] == "k2"
    old_key = jwt.PyJWKClient(meta["jwks_uri"]).get_signing_key_from_jwt(first["id_token"])
    assert jwt.decode(first["id_token"], old_key, algorithms=["RS256"], audience=CLIENT_ID)["sub"] == "alice"
