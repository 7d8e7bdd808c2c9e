"""Every name the outside world depends on, in one place.

Reverse proxies, upstream apps and IdP registrations are configured with these exact
strings (authentik's own), so each list lives here once and every module imports it.
"""

import hashlib
from enum import StrEnum


class Mode(StrEnum):
    PROXY = "proxy"
    FORWARD_SINGLE = "forward_single"
    FORWARD_DOMAIN = "forward_domain"


# The outpost's own paths: every endpoint under both prefixes. The legacy one is authentik < 2022.2's (seed 002).
OUTPOST_PREFIX = "/outpost.goauthentik.io/"
LEGACY_PREFIX = "/akprox/"
ENDPOINT_PREFIXES = (OUTPOST_PREFIX, LEGACY_PREFIX)
PING, LIVE, START, CALLBACK, SIGN_OUT = "ping", "live", "start", "callback", "sign_out"
BACKCHANNEL_LOGOUT = "backchannel_logout"  # OIDC Back-Channel Logout 1.0 (POST logout_token)
HEALTH = frozenset({PING, LIVE})  # answered for any host: readiness (ping) and liveness
ENDPOINTS = frozenset({*HEALTH, START, CALLBACK, SIGN_OUT, BACKCHANNEL_LOGOUT})
FORWARD_AUTH = "auth"  # forward auth: `<prefix>auth/<proxy kind>`, and seed 002's `/akprox/auth?<proxy kind>`
START_PATH = OUTPOST_PREFIX + START
CALLBACK_PATH = OUTPOST_PREFIX + CALLBACK
LEGACY_CALLBACK_PATH = LEGACY_PREFIX + CALLBACK
SIGN_OUT_PATH = OUTPOST_PREFIX + SIGN_OUT
# authentik's "querystring signatures": on any path of a provider's host, a query whose first value of
# one of these keys (case-sensitive) is `true` (any case) is the callback or the sign-out, tested in
# this order. In a forward-auth check they are read from the original URL. Both start with
# AUTHENTIK_PREFIX, so a query without it needs no parsing.
AUTHENTIK_PREFIX = "X-authentik-"  # authentik's identity headers and query markers
CALLBACK_MARKER, LOGOUT_MARKER = f"{AUTHENTIK_PREFIX}auth-callback", f"{AUTHENTIK_PREFIX}logout"
MARKERS = ((CALLBACK_MARKER, CALLBACK), (LOGOUT_MARKER, SIGN_OUT))
CALLBACK_QUERY = f"{CALLBACK_MARKER}=true"
LOGOUT_QUERY = f"{LOGOUT_MARKER}=true"

# The authentik release this outpost stands in for: what authentik's outpost would report (the websocket
# HELLO, X-authentik-meta-version), so authentik does not flag the outpost as outdated. Our own version is
# __version__ (in the HELLO's other fields and in /metrics); the option outpost_authentik_version overrides it.
AUTHENTIK_RELEASE = "2025.10.0"


def reported_version(release: str) -> str:
    """`X-authentik-meta-version`, as authentik's outpost writes it."""
    return f"goauthentik.io/outpost/{release}"


# Identity headers sent upstream (seeds 000/001), in groups by where their values come from. Derive lists
# from the groups by meaning, never by position in a tuple.
USERNAME = "X-authentik-username"
GROUPS = "X-authentik-groups"
ENTITLEMENTS = "X-authentik-entitlements"
EMAIL = "X-authentik-email"
NAME = "X-authentik-name"
UID = "X-authentik-uid"
JWT = "X-authentik-jwt"
USER_HEADERS = (USERNAME, GROUPS, ENTITLEMENTS, EMAIL, NAME, UID, JWT)  # the user's: from the claims and the token
META_JWKS = "X-authentik-meta-jwks"
META_OUTPOST = "X-authentik-meta-outpost"
META_PROVIDER = "X-authentik-meta-provider"
META_APP = "X-authentik-meta-app"
META_VERSION = "X-authentik-meta-version"
META_HEADERS = (META_JWKS, META_OUTPOST, META_PROVIDER, META_APP, META_VERSION)  # the provider's, the same for all
IDENTITY_HEADERS = (*USER_HEADERS, *META_HEADERS)

# Legacy names (seed 002) and the claim each one carries; sent unless outpost_legacy_headers is off.
LEGACY_HEADERS = {
    "X-Auth-Username": "preferred_username",
    "X-Auth-Groups": "groups",
    "X-Forwarded-Email": "email",
    "X-Forwarded-Preferred-Username": "preferred_username",
    "X-Forwarded-User": "sub",
}
# Every name identity may reach the upstream under (the legacy ones when on): none of them ever a client's.
ALL_IDENTITY_HEADERS = (*IDENTITY_HEADERS, *LEGACY_HEADERS)

# Headers a client may never choose for the upstream: ours, and the forwarding ones we set.
FORWARDED_FOR, FORWARDED_HOST, FORWARDED_PROTO = "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"
FORWARDING_HEADERS = (FORWARDED_FOR, FORWARDED_HOST, FORWARDED_PROTO, "Forwarded", "X-Real-IP")
ORIGINAL_URL = "X-Original-URL"  # the full URL a reverse proxy asks about (nginx configs send it)
ORIGINAL_URI = "X-Original-URI"  # or only its path and query, with the host in X-Forwarded-Host (seed 002's nginx)
FORWARDED_URI = "X-Forwarded-Uri"  # Traefik's and Caddy's path and query


def header_key(name: str) -> str:
    """The spelling-insensitive form of a header name: CGI/WSGI servers fold `_` into `-`."""
    return name.strip().lower().replace("_", "-")


PROTECTED_HEADER_KEYS = frozenset(header_key(n) for n in (*ALL_IDENTITY_HEADERS, *FORWARDING_HEADERS))
# Whole families a client may never send on: ours, every forwarding header (a proxy's to set, never a
# client's: X-Forwarded-Prefix, -Port, ...), and oauth2-proxy's identity headers, which migrated apps may trust.
PROTECTED_HEADER_PREFIXES = (header_key(AUTHENTIK_PREFIX), "x-forwarded-", "x-auth-request-")
# A client's TLS certificate as a TLS-terminating proxy in front passes it on: kept from a trusted proxy
# only (Upstream), whatever the prefixes above say.
FORWARDED_CLIENT_CERT = "X-Forwarded-Client-Cert"  # also how the embedded outpost passes on the one it was shown
CLIENT_CERTIFICATE_HEADERS = frozenset({"ssl-client-cert", "x-forwarded-tls-client-cert",
                                        header_key(FORWARDED_CLIENT_CERT)})

# Fields of one connection, never forwarded (RFC 9110 §7.6.1, and the proxy ones of RFC 9110 §11.7),
# nor accepted as additional headers. Content-Length and Transfer-Encoding frame the body: they stay.
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                                "proxy-authorization", "te", "trailer", "upgrade"})

COOKIE_PREFIX = "authentik_proxy_"  # + 8 hex digits: the session cookie; + LOGIN_COOKIE_SUFFIX: the pre-login one
LOGIN_COOKIE_SUFFIX = "_login"


def cookie_name(client_id: str) -> str:
    """authentik's per-provider session cookie name (spec §8.1)."""
    return COOKIE_PREFIX + hashlib.sha256(client_id.encode()).hexdigest()[:8]


def login_cookie_name(client_id: str) -> str:
    """The short-lived cookie that binds a login in progress to the browser that started it."""
    return cookie_name(client_id) + LOGIN_COOKIE_SUFFIX
