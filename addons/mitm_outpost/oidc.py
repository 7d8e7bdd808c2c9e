"""The relying-party side of OpenID Connect: discovery, the authorize URL, the code
exchange and ID token verification (pyjwt, JWKS with rotation), with authlib's OAuth 2.0
request helpers.

Discovery and the first JWKS fetch happen at configure time, so a login needs no extra
round trip and a misconfigured issuer stops the outpost before it serves anything.

Each IdentityProvider owns one HTTP client, made with it and used for every call to its
issuer (token, userinfo, introspection, client_credentials, JWKS): one TLS context (tens of
milliseconds of CPU to build, so never per request) and a pool of kept-alive connections.
The authorize URL needs no client at all. `aclose()` releases the client when the provider
set that uses it is replaced.
"""

import asyncio
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx2
import jwt
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import OAuth2ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7009 import prepare_revoke_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from .prometheus_metrics import IDP_LATENCY

logger = logging.getLogger("mitm_outpost.idp")

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                   "EdDSA"})
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
JWKS_REFRESH_MIN_INTERVAL = 1.0  # seconds between two fetches of the issuer's keys
HTTP_TIMEOUT = httpx2.Timeout(10.0, connect=5.0)  # seconds: connecting, then each read, write or wait for the pool
CLOCK_SKEW = 30  # seconds of leeway on exp/iat/nbf
CLOSE_DELAY = 30.0  # seconds a replaced IdP's client stays open: longer than any call on it can take
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
FORM_HEADERS = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8"}


class DiscoveryError(Exception):
    pass


class TokenError(Exception):
    """The IdP's answer cannot be trusted; the message says why (it is logged, not shown)."""


class IdPUnavailable(TokenError):
    """The IdP did not answer (connection, timeout, 5xx): nothing was decided about the credential."""


def tls_context(verify_tls: bool) -> ssl.SSLContext:
    """Made once per IdP at configure time: loading the CA bundle costs tens of milliseconds of CPU."""
    return httpx2.create_ssl_context(verify=verify_tls)


def http_client(tls: ssl.SSLContext) -> httpx2.AsyncClient:
    """The one client of an IdP. It keeps no cookies: the calls of different users share it."""
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return httpx2.AsyncClient(verify=tls, timeout=HTTP_TIMEOUT, cookies=no_cookies)


@dataclass
class JWKSCache:
    """The issuer's signing keys, refetched when a token names a key we have not seen (rotation)."""

    uri: str
    http: httpx2.AsyncClient = field(repr=False)
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = 0.0
    _lock: asyncio.Lock | None = None

    def load(self, document: dict[str, Any]) -> None:
        keys = {}
        for jwk in jwt.PyJWKSet.from_dict(document).keys:
            keys[jwk.key_id or ""] = jwk
        self.keys = keys
        self.fetched_at = time.monotonic()

    async def key_for(self, kid: str) -> jwt.PyJWK:
        if kid in self.keys:
            return self.keys[kid]
        if self._lock is None:
            self._lock = asyncio.Lock()
        asked = time.monotonic()
        async with self._lock:
            # A fetch made while this one waited answers it too: tokens naming unknown keys queue for one fetch.
            if kid not in self.keys and self.fetched_at < asked:
                await asyncio.sleep(max(0.0, self.fetched_at + JWKS_REFRESH_MIN_INTERVAL - time.monotonic()))
                with IDP_LATENCY.labels("jwks").time():
                    response = await self.http.get(self.uri)
                response.raise_for_status()
                self.load(response.json())
                logger.info("fetched JWKS from %s (%d keys)", self.uri, len(self.keys))
        if kid in self.keys:
            return self.keys[kid]
        if not kid and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        raise TokenError(f"ID token signed with unknown key id {kid!r}")


@dataclass(frozen=True)
class LoginRequest:
    """What /start sends to the IdP and what the callback needs to finish the login."""

    url: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class IdentityProvider:
    client_id: str
    client_secret: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks: JWKSCache | None  # None when ID tokens are HS256 only
    jwks_uri: str  # the issuer's JWKS URL, whatever the algorithm (X-authentik-meta-jwks)
    end_session_endpoint: str
    userinfo_endpoint: str
    introspection_endpoint: str
    algorithms: frozenset[str]
    token_auth_method: str
    http: httpx2.AsyncClient = field(repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], verify_tls: bool = True) -> "IdentityProvider":
        """Build from a provider's config fields, running discovery when endpoints are not all given."""
        tls = tls_context(verify_tls)
        doc: dict[str, Any] = dict(settings.get("oidc_configuration") or {})
        explicit = all(settings.get(k) for k in ("authorization_endpoint", "token_endpoint"))
        if not explicit:
            url = settings["issuer"].rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc.update(_get_json(url, tls))
            except Exception as e:
                raise DiscoveryError(f"cannot fetch the discovery document {url}: {e}") from None
            if doc.get("issuer", "").rstrip("/") != settings["issuer"].rstrip("/"):
                raise DiscoveryError(f"discovery document at {url} names issuer {doc.get('issuer')!r}")
        pick = lambda key: settings.get(key) or doc.get(key) or ""  # noqa: E731
        advertised = set(doc.get("id_token_signing_alg_values_supported") or ["RS256"])
        accepted = ASYMMETRIC_ALGORITHMS | (HMAC_ALGORITHMS if settings.get("client_secret") else set())
        algorithms = frozenset(advertised & accepted)
        if not algorithms:
            raise DiscoveryError(f"the issuer signs ID tokens with {sorted(advertised)}, none of which we accept")
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if not settings.get("client_secret"):
            auth_method = "none"
        elif "client_secret_basic" in methods:
            auth_method = "client_secret_basic"
        else:
            auth_method = "client_secret_post"
        for key in ("authorization_endpoint", "token_endpoint"):
            if not pick(key):
                raise DiscoveryError(f"the issuer has no {key}")
        http = http_client(tls)
        jwks = None
        if algorithms & ASYMMETRIC_ALGORITHMS:
            if not pick("jwks_uri"):
                raise DiscoveryError("the issuer has no jwks_uri to verify ID tokens with")
            jwks = JWKSCache(pick("jwks_uri"), http)
            try:
                jwks.load(_get_json(jwks.uri, tls))
            except Exception as e:
                raise DiscoveryError(f"cannot fetch the issuer's keys from {jwks.uri}: {e}") from None
        return cls(
            client_id=settings["client_id"],
            client_secret=settings.get("client_secret") or "",
            issuer=doc.get("issuer") or settings["issuer"],
            authorization_endpoint=pick("authorization_endpoint"),
            token_endpoint=pick("token_endpoint"),
            jwks=jwks,
            jwks_uri=pick("jwks_uri"),
            end_session_endpoint=pick("end_session_endpoint"),
            userinfo_endpoint=pick("userinfo_endpoint"),
            introspection_endpoint=pick("introspection_endpoint"),
            algorithms=algorithms,
            token_auth_method=auth_method,
            http=http,
        )

    def close(self) -> None:
        """For the registry, once no provider uses this IdP: its client is closed CLOSE_DELAY seconds
        later, so that calls still in flight on it (a login's code exchange) finish."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # without a loop nothing is in flight, and nothing could be awaited
        loop.call_later(CLOSE_DELAY, _start_closing, self)

    async def aclose(self) -> None:
        """Close the HTTP client now (its kept-alive connections): calls in flight on it fail."""
        await self.http.aclose()

    def login_request(self, redirect_uri: str, scope: str, state: str) -> LoginRequest:
        """An authorization-code request with PKCE S256 and a nonce: only a URL, no HTTP client."""
        nonce = generate_token(32)
        verifier = generate_token(64)
        url = prepare_grant_uri(
            self.authorization_endpoint, client_id=self.client_id, response_type="code", redirect_uri=redirect_uri,
            scope=scope or None, state=state, nonce=nonce, code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return LoginRequest(url=url, nonce=nonce, code_verifier=verifier)

    async def _send(self, call: str, method: str, url: str, **request: Any) -> httpx2.Response:
        """One call to the issuer on this IdP's client. Raises IdPUnavailable when the IdP does not
        answer, or answers with a server error: nothing is known then about what was asked."""
        try:
            with IDP_LATENCY.labels(call).time():
                response = await self.http.request(method, url, **request)
        except httpx2.HTTPError as e:
            raise IdPUnavailable(f"{call} at {url} failed: {type(e).__name__}") from None
        if response.status_code >= 500:
            raise IdPUnavailable(f"{call} at {url} answered {response.status_code}")
        return response

    async def _post_form(self, call: str, url: str, body: str, client_auth: bool = True) -> httpx2.Response:
        """A form POST, authenticated as this client (token_auth_method) unless `client_auth` is off."""
        auth = None
        if client_auth:
            auth = OAuth2ClientAuth(self.client_id, self.client_secret or None, self.token_auth_method)
        return await self._send(call, "POST", url, content=body, headers=FORM_HEADERS, auth=auth)

    async def exchange_code(self, code: str, code_verifier: str, redirect_uri: str) -> dict[str, Any]:
        started = time.monotonic()
        body = prepare_token_request("authorization_code", code=code, redirect_uri=redirect_uri,
                                     code_verifier=code_verifier)
        response = await self._post_form("token", self.token_endpoint, body)
        logger.info("idp: token exchange at %s answered in %.0f ms", self.token_endpoint,
                    (time.monotonic() - started) * 1000)
        return _token_answer(response, f"token exchange at {self.token_endpoint}")

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection with this client's credentials."""
        if not self.introspection_endpoint:
            raise TokenError("the issuer has no introspection endpoint")
        body, _ = prepare_revoke_token_request(token)  # the same form: token=...
        response = await self._post_form("introspection", self.introspection_endpoint, body)
        logger.info("idp: introspection at %s answered %d", self.introspection_endpoint, response.status_code)
        answer = _json(response) if response.status_code == 200 else None
        if not isinstance(answer, dict):
            raise TokenError(f"introspection answered {response.status_code}")
        return answer

    async def userinfo(self, token: str) -> dict[str, Any]:
        bearer = {"Authorization": f"Bearer {token}"}
        response = await self._send("userinfo", "GET", self.userinfo_endpoint, headers=bearer)
        if response.status_code != 200:
            raise TokenError(f"userinfo answered {response.status_code}")
        answer = _json(response)
        if not isinstance(answer, dict):
            raise TokenError("userinfo is not a JSON object")
        return answer

    async def client_credentials(self, username: str, password: str, scope: str) -> dict[str, Any]:
        """authentik's header Basic auth: a client_credentials grant with a user's app password
        (the client is named by client_id in the form, without its secret, as authentik expects)."""
        body = prepare_token_request("client_credentials", client_id=self.client_id, username=username,
                                     password=password, scope=scope)
        response = await self._post_form("client_credentials", self.token_endpoint, body, client_auth=False)
        answer = _json(response)
        if response.status_code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("id_token"), str):
            raise TokenError(f"client_credentials answered {response.status_code} without an id_token")
        return answer

    async def _decode(self, token: str, what: str, required: list[str]) -> dict[str, Any]:
        """A JWT from this issuer for this client: an algorithm it advertises, its key (JWKS,
        or client_secret for HS*), iss, aud, the `required` claims, times with a little leeway."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise TokenError(f"{what} is not a JWT: {e}") from None
        alg = header.get("alg", "")
        if alg not in self.algorithms:
            raise TokenError(f"{what} signed with {alg!r}; the issuer advertises {sorted(self.algorithms)}")
        if alg in HMAC_ALGORITHMS:
            key: Any = self.client_secret.encode()
        else:
            assert self.jwks is not None
            key = await self.jwks.key_for(header.get("kid") or "")
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=self.client_id, issuer=self.issuer,
                              leeway=CLOCK_SKEW, options={"require": required})
        except jwt.PyJWTError as e:
            raise TokenError(f"{what} rejected: {e}") from None

    async def verify_id_token(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        """An ID token (or a JWT access token checked locally, nonce None): signature, iss,
        aud containing this client (and azp when there are several audiences), exp, iat."""
        claims = await self._decode(id_token, "ID token", ["iss", "aud", "exp", "iat", "sub"])
        if nonce is not None and claims.get("nonce") != nonce:
            raise TokenError("ID token nonce does not match the login")
        azp = claims.get("azp")
        if isinstance(claims.get("aud"), list) and len(claims["aud"]) > 1 and azp != self.client_id:
            raise TokenError("ID token has several audiences and another authorized party")
        return claims

    async def verify_logout_token(self, token: str) -> dict[str, Any]:
        """A Back-Channel Logout token: signed by the issuer for this client, with the logout
        event, a `jti`, `sid` or `sub`, and no `nonce` (OIDC Back-Channel Logout 1.0 §2.6)."""
        claims = await self._decode(token, "logout_token", ["iss", "aud", "iat", "jti"])
        events = claims.get("events")
        if not isinstance(events, dict) or BACKCHANNEL_EVENT not in events:
            raise TokenError("logout_token lacks the back-channel logout event")
        if "nonce" in claims:
            raise TokenError("logout_token carries a nonce")
        if not claims.get("sid") and not claims.get("sub"):
            raise TokenError("logout_token names neither sid nor sub")
        return claims

    def end_session_url(self, id_token_hint: str) -> str:
        params = {"id_token_hint": id_token_hint, "client_id": self.client_id}
        return str(httpx2.URL(self.end_session_endpoint, params=params))


_closing: set[asyncio.Task[None]] = set()  # closes under way: the loop itself holds tasks only weakly


def _start_closing(idp: IdentityProvider) -> None:
    task = asyncio.get_running_loop().create_task(idp.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _get_json(url: str, tls: ssl.SSLContext) -> dict[str, Any]:
    """A blocking GET, for configure time only."""
    response = httpx2.get(url, timeout=HTTP_TIMEOUT, verify=tls)
    response.raise_for_status()
    try:
        doc = response.json()
    except json.JSONDecodeError:
        raise ValueError("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    return doc


def _json(response: httpx2.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _token_answer(response: httpx2.Response, what: str) -> dict[str, Any]:
    """A token endpoint's answer (RFC 6749 §5): a JSON object with 200, else the error code it names."""
    answer = _json(response)
    if response.status_code == 200 and isinstance(answer, dict) and "error" not in answer:
        return answer
    error = answer.get("error") if isinstance(answer, dict) else None
    raise TokenError(f"{what} answered {response.status_code}" + (f" ({error})" if isinstance(error, str) else ""))
