"""The IdP's one HTTP client: made with the IdentityProvider, reused for every call, never per login.

A small IdP on loopback (HTTP/1.1, kept-alive connections) counts the connections and records the
requests, so "one client" is checked by what reaches the wire, not by looking inside httpx.
"""

import asyncio
import base64
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mitm_outpost import oidc
from mitm_outpost.oidc import IdentityProvider, IdPUnavailable, TokenError
from mitm_outpost.registry import Registry
from mitm_outpost.testing.processes import free_port
from tests.unit.conftest import make_provider

CLIENT_ID, CLIENT_SECRET = "app-client", "s3cret"


def rsa_jwk(kid: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, {**public, "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class LoopbackIdP:
    """Discovery, JWKS, token, introspection and userinfo; every answer sets a cookie."""

    keys: list[dict[str, Any]]
    token_status: int = 200
    introspection_status: int = 200
    connections: int = 0
    requests: list[tuple[str, str, dict[str, str], str]] = field(default_factory=list)  # method, path, headers, body
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _, _ in self.requests if method in (None, m)]

    def start(self) -> None:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a reused client makes one connection

            def setup(self) -> None:
                super().setup()
                idp.connections += 1

            def do_GET(self) -> None:
                self._record("")
                if self.path == "/.well-known/openid-configuration":
                    base = idp.url
                    return self._json(200, {
                        "issuer": base, "authorization_endpoint": f"{base}/authorize",
                        "token_endpoint": f"{base}/token", "jwks_uri": f"{base}/jwks",
                        "userinfo_endpoint": f"{base}/userinfo", "introspection_endpoint": f"{base}/introspect",
                        "id_token_signing_alg_values_supported": ["RS256"],
                    })
                if self.path == "/jwks":
                    return self._json(200, {"keys": idp.keys})
                if self.path == "/userinfo":
                    return self._json(200, {"sub": "u1", "preferred_username": "alice"})
                self._json(404, {})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                self._record(body)
                if self.path == "/token":
                    return self._json(idp.token_status, {"access_token": "at", "id_token": "it", "token_type": "Bearer"}
                                      if idp.token_status == 200 else {"error": "invalid_grant"})
                if self.path == "/introspect":
                    return self._json(idp.introspection_status, {"active": True, "sub": "u1", "client_id": CLIENT_ID})
                self._json(404, {})

            def _record(self, body: str) -> None:
                idp.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))

            def _json(self, status: int, document: dict[str, Any]) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Set-Cookie", "lb=sticky-to-one-user; Path=/")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def signing() -> tuple[Any, dict[str, Any]]:
    return rsa_jwk("k1")


@pytest.fixture
def loopback(signing: tuple[Any, dict[str, Any]]) -> Iterator[LoopbackIdP]:
    idp = LoopbackIdP([signing[1]])
    idp.start()
    yield idp
    idp.stop()


def discovered(loopback: LoopbackIdP, **settings: Any) -> IdentityProvider:
    return IdentityProvider.from_settings({"issuer": loopback.url, "client_id": CLIENT_ID,
                                           "client_secret": CLIENT_SECRET, **settings})


@pytest.fixture
def ssl_contexts(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """Every SSLContext made from now on (ssl.create_default_context and httpx's own go through it)."""
    made: list[type] = []
    original = ssl.SSLContext.__new__

    def counting(cls: type, *args: Any, **kwargs: Any) -> Any:
        made.append(cls)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "__new__", counting)
    return made


def test_login_request_makes_no_client_and_no_tls_context(ssl_contexts: list[type]) -> None:
    provider = make_provider()
    assert len(ssl_contexts) == 1  # the IdP's one context, made with it (the counter counts)
    for n in range(100):
        login = provider.idp.login_request(provider.redirect_uri, provider.scope, f"state-{n}")
    assert len(ssl_contexts) == 1
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(login.url).query))
    assert query == {
        "response_type": "code", "client_id": CLIENT_ID, "redirect_uri": provider.redirect_uri, "scope": provider.scope,
        "state": "state-99", "nonce": login.nonce, "code_challenge_method": "S256",
        "code_challenge": oidc.create_s256_code_challenge(login.code_verifier),
    }
    assert len(login.nonce) == 32 and len(login.code_verifier) == 64


def test_the_client_has_connect_and_read_timeouts() -> None:
    timeout = make_provider().idp.http.timeout
    assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (5.0, 10.0, 10.0, 10.0)


async def test_every_call_shares_one_client_and_one_connection(loopback: LoopbackIdP,
                                                               signing: tuple[Any, dict[str, Any]],
                                                               ssl_contexts: list[type],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oidc, "JWKS_REFRESH_MIN_INTERVAL", 0.0)
    idp = discovered(loopback)
    made, connected, asked = len(ssl_contexts), loopback.connections, len(loopback.requests)
    assert made == 1  # for discovery and the first JWKS fetch (at configure time) too
    await idp.exchange_code("code-1", "verifier-1", "https://app.example.test/cb")
    await idp.introspect("token-1")
    await idp.userinfo("token-1")
    await idp.client_credentials("svc", "app-password", "openid")
    key, rotated = rsa_jwk("k2")  # a new signing key: the JWKS is fetched again, on the same client
    loopback.keys = [signing[1], rotated]
    now = int(time.time())
    token = jwt.encode({"iss": loopback.url, "aud": CLIENT_ID, "sub": "u1", "iat": now, "exp": now + 60}, key,
                       algorithm="RS256", headers={"kid": "k2"})
    assert (await idp.verify_id_token(token, None))["sub"] == "u1"
    assert len(ssl_contexts) == made and loopback.connections == connected + 1
    assert loopback.paths()[asked:] == ["/token", "/introspect", "/userinfo", "/token", "/jwks"]
    assert not [headers for _, _, headers, _ in loopback.requests if "cookie" in headers]  # none rides along
    await idp.aclose()
    assert idp.http.is_closed


async def test_token_calls_are_the_oauth_forms(loopback: LoopbackIdP) -> None:
    idp = discovered(loopback)
    await idp.exchange_code("code-1", "verifier-1", "https://app.example.test/cb")
    await idp.introspect("token-1")
    await idp.client_credentials("svc", "app-password", "openid profile")
    exchange, introspect, grant = (headers for _, _, headers, _ in loopback.requests[-3:])
    exchange_body, introspect_body, grant_body = (body for _, _, _, body in loopback.requests[-3:])
    basic = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert exchange["authorization"] == basic and introspect["authorization"] == basic
    assert dict(urllib.parse.parse_qsl(exchange_body)) == {
        "grant_type": "authorization_code", "redirect_uri": "https://app.example.test/cb", "code": "code-1",
        "code_verifier": "verifier-1"}
    assert dict(urllib.parse.parse_qsl(introspect_body)) == {"token": "token-1"}
    # authentik's app-password grant names the client in the form and sends no secret.
    assert "authorization" not in grant
    assert dict(urllib.parse.parse_qsl(grant_body)) == {
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "username": "svc", "password": "app-password",
        "scope": "openid profile"}


async def test_client_secret_post_puts_the_secret_in_the_form(loopback: LoopbackIdP) -> None:
    idp = discovered(loopback, oidc_configuration={"token_endpoint_auth_methods_supported": ["client_secret_post"]})
    await idp.exchange_code("code-1", "verifier-1", "https://app.example.test/cb")
    _, _, headers, body = loopback.requests[-1]
    assert "authorization" not in headers
    assert dict(urllib.parse.parse_qsl(body))["client_secret"] == CLIENT_SECRET


async def test_refusals_are_token_errors_and_outages_say_so(loopback: LoopbackIdP) -> None:
    idp = discovered(loopback)
    loopback.token_status = 400
    with pytest.raises(TokenError, match=r"answered 400 \(invalid_grant\)") as refused:
        await idp.exchange_code("code-1", "verifier-1", "https://app.example.test/cb")
    assert not isinstance(refused.value, IdPUnavailable)
    loopback.introspection_status = 503
    with pytest.raises(IdPUnavailable, match="answered 503"):
        await idp.introspect("token-1")
    nobody = discovered(loopback, userinfo_endpoint=f"http://127.0.0.1:{free_port()}/userinfo")
    with pytest.raises(IdPUnavailable, match="ConnectError"):
        await nobody.userinfo("token-1")


async def test_concurrent_unknown_key_ids_share_one_jwks_fetch(loopback: LoopbackIdP,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oidc, "JWKS_REFRESH_MIN_INTERVAL", 0.0)
    idp = discovered(loopback)
    fetched = loopback.paths().count("/jwks")
    key, _ = rsa_jwk("unpublished")
    now = int(time.time())
    forged = [jwt.encode({"iss": loopback.url, "aud": CLIENT_ID, "sub": f"u{n}", "iat": now, "exp": now + 60}, key,
                         algorithm="RS256", headers={"kid": f"kid-{n}"}) for n in range(20)]
    results = await asyncio.gather(*(idp.verify_id_token(token, None) for token in forged), return_exceptions=True)
    assert all(isinstance(r, TokenError) and "unknown key id" in str(r) for r in results)
    assert loopback.paths().count("/jwks") == fetched + 1  # one fetch answers those that queued behind it



async def test_a_replaced_providers_client_is_closed_after_calls_in_flight_could_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oidc, "CLOSE_DELAY", 0.05)
    registry = Registry()
    first, second = make_provider(), make_provider()
    registry.replace("test-outpost", (first,))
    registry.replace("test-outpost", (second,))
    assert not first.idp.http.is_closed  # a code exchange started before the swap may still be using it
    await asyncio.sleep(0.2)
    assert first.idp.http.is_closed and not second.idp.http.is_closed


def test_closing_without_a_loop_does_nothing() -> None:
    make_provider().idp.close()
