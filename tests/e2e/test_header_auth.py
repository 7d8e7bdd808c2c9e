"""Header authentication against panva's oidc-provider: introspection, token confusion, caching,
local JWT verification; through the proxy mode and through real nginx and Traefik."""

from __future__ import annotations

import base64
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from mitm_outpost.testing.processes import free_port
from tests.e2e.test_forward_auth import LoopbackTransport
from tests.support.authentik_token import AuthentikTokenEndpoint
from tests.support.panva import PanvaOP, code_flow_tokens, make_rsa_jwk
from tests.support.processes import RUNNERS, Outpost, provider_entry
from tests.support.proxies import proxy_for, require_or_skip, standard_values

ACCOUNTS = {"alice": {"email": "alice@example.test", "name": "Alice", "preferred_username": "alice",
                      "groups": ["admins"]}}
CACHE_TTL = 2
HEADER_AUTH_CONFIGS = ("nginx-single.conf", "traefik-single.yml")


@dataclass
class World:
    op: PanvaOP
    outpost: Outpost
    port: int
    local_port: int  # the external port of the provider that verifies JWTs locally (same listener)
    callback: str
    meta: dict[str, Any]

    def token_of_a(self) -> dict[str, Any]:
        return code_flow_tokens(self.op, "hdr-a", "secret-a", self.callback, "alice")

    def token_of_b(self) -> str:
        response = httpx2.post(self.meta["token_endpoint"], auth=("hdr-b", "secret-b"),
                               data={"grant_type": "client_credentials"})
        return str(response.raise_for_status().json()["access_token"])


@pytest.fixture(scope="module")
def world(upstream: str) -> Iterator[World]:
    port, local_port = free_port(), free_port()
    callback = f"http://127.0.0.1:{port}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
    clients = [
        {"client_id": "hdr-a", "client_secret": "secret-a", "redirect_uris": [callback],
         "token_endpoint_auth_method": "client_secret_basic"},
        {"client_id": "hdr-b", "client_secret": "secret-b", "redirect_uris": [callback],
         "token_endpoint_auth_method": "client_secret_basic"},
    ]
    with PanvaOP(clients, ACCOUNTS, [make_rsa_jwk("k1")]) as op:
        providers = [
            provider_entry("hdr", port, upstream, op.issuer, client_id="hdr-a", client_secret="secret-a"),
            provider_entry("hdr-local", local_port, upstream, op.issuer, client_id="hdr-a", client_secret="secret-a",
                           verify_bearer_jwt_locally=True, cookie_secret="another-key-for-state"),
        ]
        with Outpost(providers, port, extra=["--set", f"header_auth_cache_ttl={CACHE_TTL}"]) as outpost:
            meta = httpx2.get(f"{op.issuer}/.well-known/openid-configuration").json()
            yield World(op, outpost, port, local_port, callback, meta)


def call(world: World, authorization: str, **headers: str) -> httpx2.Response:
    return httpx2.get(f"http://127.0.0.1:{world.port}/headers", headers={"Authorization": authorization, **headers})


def test_bearer_token_of_this_client(world: World) -> None:
    response = call(world, f"Bearer {world.token_of_a()['access_token']}")
    assert response.status_code == 200
    seen = {k.lower(): v for k, v in response.json()["headers"]}
    assert seen["x-authentik-username"] == "alice" and seen["x-authentik-groups"] == "admins"
    assert "authorization" not in seen  # consumed by the outpost
    assert "set-cookie" not in response.headers  # no session: revocation takes effect when the cache ends


def test_token_of_another_client_is_refused(world: World) -> None:
    response = call(world, f"Bearer {world.token_of_b()}")
    assert response.status_code == 401 and "Bearer" in response.headers["WWW-Authenticate"]
    assert "issued to another client ('hdr-b')" in world.outpost.output


def test_basic_with_the_token_user_name(world: World) -> None:
    token = world.token_of_a()["access_token"]
    basic = base64.b64encode(f"goauthentik.io/token:{token}".encode()).decode()
    assert call(world, f"Basic {basic}").status_code == 200


@pytest.mark.parametrize("authorization", ["Bearer garbage", "Bearer", "Basic !!!",
                                           "Basic " + base64.b64encode(b"nobody:pw").decode()])
def test_bad_credentials_get_401_not_a_redirect(world: World, authorization: str) -> None:
    response = call(world, authorization, Accept="text/html")
    assert response.status_code == 401 and "WWW-Authenticate" in response.headers


def test_revoked_token_stops_working_when_the_cache_entry_ends(world: World) -> None:
    token = world.token_of_a()["access_token"]
    assert call(world, f"Bearer {token}").status_code == 200
    httpx2.post(world.meta["revocation_endpoint"], auth=("hdr-a", "secret-a"), data={"token": token}).raise_for_status()
    assert call(world, f"Bearer {token}").status_code == 200  # still cached
    time.sleep(CACHE_TTL + 0.5)
    assert call(world, f"Bearer {token}").status_code == 401


def test_jwt_verified_locally_when_the_provider_enables_it(world: World) -> None:
    id_token = world.token_of_a()["id_token"]
    response = call(world, f"Bearer {id_token}", Host=f"127.0.0.1:{world.local_port}")
    assert response.status_code == 200
    assert {k.lower(): v for k, v in response.json()["headers"]}["x-authentik-username"] == "alice"
    # The introspecting provider does not take an ID token as an access token.
    assert call(world, f"Bearer {id_token}").status_code == 401


def test_authentik_basic_app_password(upstream: str) -> None:
    with AuthentikTokenEndpoint("basic-app", "basic-secret", {"svc": "app-password"}) as authentik:
        port = free_port()
        entry = provider_entry("basic", port, upstream, authentik.issuer, client_id="basic-app",
                               client_secret="basic-secret")
        with Outpost([entry], port) as outpost:
            good = base64.b64encode(b"svc:app-password").decode()
            response = httpx2.get(f"{outpost.url}/headers", headers={"Authorization": f"Basic {good}"})
            assert response.status_code == 200
            seen = {k.lower(): v for k, v in response.json()["headers"]}
            assert seen["x-authentik-username"] == "svc" and seen["x-authentik-groups"] == "api"
            # HS256 with no signing key: authentik still sends the provider's JWKS URL
            assert seen["x-authentik-meta-jwks"] == f"http://127.0.0.1:{authentik.port}/application/o/app/jwks/"
            bad = base64.b64encode(b"svc:wrong").decode()
            assert httpx2.get(f"{outpost.url}/headers", headers={"Authorization": f"Basic {bad}"}).status_code == 401


def test_intercept_off_sends_browsers_to_login(world: World, upstream: str) -> None:
    port = free_port()
    entry = provider_entry("nointercept", port, upstream, world.op.issuer, client_id="hdr-a", client_secret="secret-a",
                           intercept_header_auth=False)
    with Outpost([entry], port) as outpost:
        response = httpx2.get(f"{outpost.url}/headers",
                              headers={"Authorization": "Bearer garbage", "Accept": "text/html"})
        assert response.status_code == 302 and "/outpost.goauthentik.io/start" in response.headers["location"]


@pytest.mark.parametrize(("template", "tool"), [(t, tool) for t in HEADER_AUTH_CONFIGS for tool in RUNNERS],
                         ids=[f"{t}-{tool}" for t in HEADER_AUTH_CONFIGS for tool in RUNNERS])
def test_header_auth_through_forward_auth(world: World, upstream: str, template: str, tool: str) -> None:
    require_or_skip(template.split("-")[0])
    proxy_port, outpost_port = free_port(), free_port()
    entry = {"name": "hdr-fwd", "mode": "forward_single", "external_host": f"http://app.example.test:{proxy_port}",
             "issuer": world.op.issuer, "client_id": "hdr-a", "client_secret": "secret-a"}
    up = urllib.parse.urlsplit(upstream)
    values = standard_values(port=proxy_port, outpost=("127.0.0.1", outpost_port), upstream=(up.hostname, up.port),
                             domain="example.test")
    with Outpost([entry], outpost_port, tool=tool), proxy_for(template, tempfile.mkdtemp(prefix="hdr-"), values):
        client = httpx2.Client(transport=LoopbackTransport(), follow_redirects=False, timeout=15)
        url = f"http://app.example.test:{proxy_port}/headers"
        response = client.get(url, headers={"Authorization": f"Bearer {world.token_of_a()['access_token']}"})
        assert response.status_code == 200
        assert {k.lower(): v for k, v in response.json()["headers"]}["x-authentik-username"] == "alice"
        refused = client.get(url, headers={"Authorization": f"Bearer {world.token_of_b()}"})
        assert (refused.status_code, "alice" in refused.text) == (302 if template.startswith("nginx") else 401, False)
        if template.startswith("traefik"):  # relayed verbatim: the API client sees the outpost's 401
            assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
