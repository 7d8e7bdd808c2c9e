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


# The outpost's own paths. The legacy prefix is the one of authentik < 2022.2 (seed 002).
ENDPOINT_PREFIXES = ("/outpost.goauthentik.io/", "/akprox/")  # keep in step with LEGACY_PREFIX
PING, LIVE, START, CALLBACK, SIGN_OUT = "ping", "live", "start", "callback", "sign_out"
BACKCHANNEL_LOGOUT = "backchannel_logout"  # OIDC Back-Channel Logout 1.0 (POST logout_token)
HEALTH = frozenset({PING, LIVE})  # answered for any host: readiness (ping) and liveness
ENDPOINTS = frozenset({*HEALTH, START, CALLBACK, SIGN_OUT, BACKCHANNEL_LOGOUT})
CALLBACK_PATH = "/outpost.goauthentik.io/callback"
LEGACY_PREFIX = "/akprox/"
LEGACY_CALLBACK_PATH = "/akprox/callback"
# authentik's "querystring signatures": on any path of a provider's host, a query whose first value of
# one of these keys (case-sensitive) is `true` (any case) is the callback or the sign-out, tested in
# this order. In a forward-auth check they are read from the original URL.
CALLBACK_MARKER, LOGOUT_MARKER = "X-authentik-auth-callback", "X-authentik-logout"
MARKERS = ((CALLBACK_MARKER, CALLBACK), (LOGOUT_MARKER, SIGN_OUT))
CALLBACK_QUERY = f"{CALLBACK_MARKER}=true"
LOGOUT_QUERY = f"{LOGOUT_MARKER}=true"
START_PATH = "/outpost.goauthentik.io/start"

# The authentik release this outpost stands in for: what authentik's outpost would report (the websocket
# HELLO, X-authentik-meta-version), so authentik does not flag the outpost as outdated. Our own version is
# __version__ (in the HELLO's other fields and in /metrics); the option outpost_authentik_version overrides it.
AUTHENTIK_RELEASE = "2025.10.0"


def reported_version(release: str) -> str:
    """`X-authentik-meta-version`, as authentik's outpost writes it."""
    return f"goauthentik.io/outpost/{release}"

# Identity headers sent upstream (seeds 000/001), in the order the upstream sees them.
USERNAME = "X-authentik-username"
GROUPS = "X-authentik-groups"
ENTITLEMENTS = "X-authentik-entitlements"
EMAIL = "X-authentik-email"
NAME = "X-authentik-name"
UID = "X-authentik-uid"
JWT = "X-authentik-jwt"
META_JWKS = "X-authentik-meta-jwks"
META_OUTPOST = "X-authentik-meta-outpost"
META_PROVIDER = "X-authentik-meta-provider"
META_APP = "X-authentik-meta-app"
META_VERSION = "X-authentik-meta-version"
IDENTITY_HEADERS = (
    USERNAME, GROUPS, ENTITLEMENTS, EMAIL, NAME, UID, JWT,
    META_JWKS, META_OUTPOST, META_PROVIDER, META_APP, META_VERSION,
)

# Legacy names (seed 002) and the claim each one carries.
LEGACY_HEADERS = {
    "X-Auth-Username": "preferred_username",
    "X-Auth-Groups": "groups",
    "X-Forwarded-Email": "email",
    "X-Forwarded-Preferred-Username": "preferred_username",
    "X-Forwarded-User": "sub",
}

# Headers a client may never choose for the upstream: ours, and the forwarding ones we set.
FORWARDING_HEADERS = ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Real-IP")


def header_key(name: str) -> str:
    """The spelling-insensitive form of a header name: CGI/WSGI servers fold `_` into `-`."""
    return name.strip().lower().replace("_", "-")


PROTECTED_HEADER_KEYS = frozenset(
    header_key(n) for n in (*IDENTITY_HEADERS, *LEGACY_HEADERS, *FORWARDING_HEADERS)
)
# Whole families a client may never send on: ours, every forwarding header (a proxy's to set, never a
# client's: X-Forwarded-Prefix, -Port, ...), and oauth2-proxy's identity headers, which migrated apps may trust.
PROTECTED_HEADER_PREFIXES = ("x-authentik-", "x-forwarded-", "x-auth-request-")
# A client's TLS certificate as a TLS-terminating proxy in front passes it on: kept from a trusted proxy
# only (Upstream), whatever the prefixes above say.
CLIENT_CERTIFICATE_HEADERS = frozenset({"ssl-client-cert", "x-forwarded-tls-client-cert", "x-forwarded-client-cert"})

# Fields of one connection, never forwarded (RFC 9110 §7.6.1, and the proxy ones of RFC 9110 §11.7),
# nor accepted as additional headers. Content-Length and Transfer-Encoding frame the body: they stay.
HOP_BY_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                                "proxy-authorization", "te", "trailer", "upgrade"})

COOKIE_PREFIX = "authentik_proxy_"


def cookie_name(client_id: str) -> str:
    """authentik's per-provider session cookie name (spec §8.1)."""
    return COOKIE_PREFIX + hashlib.sha256(client_id.encode()).hexdigest()[:8]


def login_cookie_name(client_id: str) -> str:
    """The short-lived cookie that binds a login in progress to the browser that started it."""
    return cookie_name(client_id) + "_login"
