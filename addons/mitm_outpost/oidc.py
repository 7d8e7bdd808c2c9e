"""The relying-party side of OpenID Connect: discovery, the authorize URL, the code
exchange (authlib) and ID token verification (pyjwt, JWKS with rotation).

Discovery and the first JWKS fetch happen at configure time, so a login needs no extra
round trip and a misconfigured issuer stops the outpost before it serves anything.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx2
import jwt
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client

from .telemetry import IDP_LATENCY

logger = logging.getLogger("mitm_outpost.idp")

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
JWKS_REFRESH_MIN_INTERVAL = 1.0  # seconds between two fetches of the issuer's keys
HTTP_TIMEOUT = 10.0
CLOCK_SKEW = 30  # seconds of leeway on exp/iat/nbf
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


class DiscoveryError(Exception):
    pass


class TokenError(Exception):
    """The IdP's answer cannot be trusted; the message says why (it is logged, not shown)."""


@dataclass
class JWKSCache:
    """The issuer's signing keys, refetched when a token names a key we have not seen (rotation)."""

    uri: str
    verify_tls: bool = True
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = 0.0
    _lock: asyncio.Lock | None = None

    def load(self, document: dict[str, Any]) -> None:
        keys = {}
        for jwk in jwt.PyJWKSet.from_dict(document).keys:
            keys[jwk.key_id or ""] = jwk
        self.keys = keys
        self.fetched_at = time.monotonic()

    def fetch_now(self) -> None:
        """Blocking fetch, for configure time only."""
        self.load(_get_json(self.uri, self.verify_tls))

    async def key_for(self, kid: str) -> jwt.PyJWK:
        if kid in self.keys:
            return self.keys[kid]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if kid not in self.keys:
                await asyncio.sleep(max(0.0, self.fetched_at + JWKS_REFRESH_MIN_INTERVAL - time.monotonic()))
                async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, verify=self.verify_tls) as client:
                    with IDP_LATENCY.labels("jwks").time():
                        response = await client.get(self.uri)
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
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class IdentityProvider:
    client_id: str
    client_secret: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks: JWKSCache | None
    end_session_endpoint: str
    userinfo_endpoint: str
    introspection_endpoint: str
    algorithms: frozenset[str]
    token_auth_method: str
    verify_tls: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any], verify_tls: bool = True) -> "IdentityProvider":
        """Build from a provider's config fields, running discovery when endpoints are not all given."""
        doc: dict[str, Any] = dict(settings.get("oidc_configuration") or {})
        explicit = all(settings.get(k) for k in ("authorization_endpoint", "token_endpoint"))
        if not explicit:
            url = settings["issuer"].rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc.update(_get_json(url, verify_tls))
            except Exception as e:
                raise DiscoveryError(f"cannot fetch the discovery document {url}: {e}") from None
            if doc.get("issuer", "").rstrip("/") != settings["issuer"].rstrip("/"):
                raise DiscoveryError(f"discovery document at {url} names issuer {doc.get('issuer')!r}")
        pick = lambda key: settings.get(key) or doc.get(key) or ""  # noqa: E731
        advertised = set(doc.get("id_token_signing_alg_values_supported") or ["RS256"])
        algorithms = frozenset(advertised & (ASYMMETRIC_ALGORITHMS | (HMAC_ALGORITHMS if settings.get("client_secret") else set())))
        if not algorithms:
            raise DiscoveryError(f"the issuer signs ID tokens with {sorted(advertised)}, none of which we accept")
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if not settings.get("client_secret"):
            auth_method = "none"
        elif "client_secret_basic" in methods:
            auth_method = "client_secret_basic"
        else:
            auth_method = "client_secret_post"
        jwks = None
        if algorithms & ASYMMETRIC_ALGORITHMS:
            if not pick("jwks_uri"):
                raise DiscoveryError("the issuer has no jwks_uri to verify ID tokens with")
            jwks = JWKSCache(pick("jwks_uri"), verify_tls)
            try:
                jwks.fetch_now()
            except Exception as e:
                raise DiscoveryError(f"cannot fetch the issuer's keys from {jwks.uri}: {e}") from None
        for key in ("authorization_endpoint", "token_endpoint"):
            if not pick(key):
                raise DiscoveryError(f"the issuer has no {key}")
        return cls(
            client_id=settings["client_id"],
            client_secret=settings.get("client_secret") or "",
            issuer=doc.get("issuer") or settings["issuer"],
            authorization_endpoint=pick("authorization_endpoint"),
            token_endpoint=pick("token_endpoint"),
            jwks=jwks,
            end_session_endpoint=pick("end_session_endpoint"),
            userinfo_endpoint=pick("userinfo_endpoint"),
            introspection_endpoint=pick("introspection_endpoint"),
            algorithms=algorithms,
            token_auth_method=auth_method,
            verify_tls=verify_tls,
        )

    def _client(self, redirect_uri: str, scope: str = "") -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret or None,
            token_endpoint_auth_method=self.token_auth_method,
            redirect_uri=redirect_uri,
            scope=scope or None,
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT,
            verify=self.verify_tls,
        )

    def login_request(self, redirect_uri: str, scope: str, state: str) -> LoginRequest:
        """An authorization-code request with PKCE S256 and a nonce."""
        nonce = generate_token(32)
        verifier = generate_token(64)
        client = self._client(redirect_uri, scope)
        url, _ = client.create_authorization_url(
            self.authorization_endpoint, state=state, nonce=nonce, code_verifier=verifier
        )
        return LoginRequest(url=url, state=state, nonce=nonce, code_verifier=verifier)

    async def exchange_code(self, code: str, code_verifier: str, redirect_uri: str) -> dict[str, Any]:
        async with self._client(redirect_uri) as client:
            try:
                with IDP_LATENCY.labels("token").time():
                    started = time.monotonic()
                    token = await client.fetch_token(
                        self.token_endpoint, grant_type="authorization_code", code=code, code_verifier=code_verifier
                    )
                    logger.info("idp: token exchange at %s answered in %.0f ms", self.token_endpoint, (time.monotonic() - started) * 1000)
            except Exception as e:
                raise TokenError(f"token exchange at {self.token_endpoint} failed: {e}") from None
        return dict(token)

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection with this client's credentials."""
        if not self.introspection_endpoint:
            raise TokenError("the issuer has no introspection endpoint")
        async with self._client("") as client:
            try:
                with IDP_LATENCY.labels("introspection").time():
                    response = await client.introspect_token(self.introspection_endpoint, token=token)
                logger.info("idp: introspection at %s answered %d", self.introspection_endpoint, response.status_code)
                answer = response.json() if response.status_code == 200 else None
            except Exception as e:
                raise TokenError(f"introspection at {self.introspection_endpoint} failed: {e}") from None
        if not isinstance(answer, dict):
            raise TokenError(f"introspection answered {response.status_code}")
        return answer

    async def userinfo(self, token: str) -> dict[str, Any]:
        async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, verify=self.verify_tls) as client:
            with IDP_LATENCY.labels("userinfo").time():
                response = await client.get(self.userinfo_endpoint, headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 200:
            raise TokenError(f"userinfo answered {response.status_code}")
        answer = response.json()
        if not isinstance(answer, dict):
            raise TokenError("userinfo is not a JSON object")
        return answer

    async def client_credentials(self, username: str, password: str, scope: str) -> dict[str, Any]:
        """authentik's header Basic auth: a client_credentials grant with a user's app password."""
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "username": username,
                "password": password, "scope": scope}
        async with httpx2.AsyncClient(timeout=HTTP_TIMEOUT, verify=self.verify_tls) as client:
            try:
                with IDP_LATENCY.labels("client_credentials").time():
                    response = await client.post(self.token_endpoint, data=form)
                answer = response.json()
            except Exception as e:
                raise TokenError(f"client_credentials at {self.token_endpoint} failed: {e}") from None
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

    def end_session_url(self, id_token_hint: str, post_logout_redirect_uri: str = "") -> str:
        params = {"id_token_hint": id_token_hint, "client_id": self.client_id}
        if post_logout_redirect_uri:
            params["post_logout_redirect_uri"] = post_logout_redirect_uri
        return str(httpx2.URL(self.end_session_endpoint, params=params))


def _get_json(url: str, verify_tls: bool) -> dict[str, Any]:
    response = httpx2.get(url, timeout=HTTP_TIMEOUT, verify=verify_tls)
    response.raise_for_status()
    try:
        doc = response.json()
    except json.JSONDecodeError:
        raise ValueError("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("the answer is not a JSON object")
    return doc
