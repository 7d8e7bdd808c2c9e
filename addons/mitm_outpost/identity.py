"""From verified claims to a session: the headers the upstream receives and where it goes.

Computed once, at login (or header authentication), so a request only copies tuples. The
`ak_proxy` claim (authentik's scope mapping) is untrusted input like any other: each part
is checked here and a bad part is refused with a log line, never half-applied.
"""

import base64
import json
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ada_url

from . import names
from .sessions import HeaderFields, Session, shared
from .urls import HTTP_SCHEMES, has_control_chars

if TYPE_CHECKING:
    from .provider import Provider

logger = logging.getLogger("mitm_outpost")

_TOKEN = re.compile(r"^[!#$%&'*+.^`|~0-9A-Za-z-]+$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Names an additional header may not have: hop-by-hop ones, and those of the message and its framing.
NOT_ADDITIONAL = names.HOP_BY_HOP_HEADERS | {"transfer-encoding", "host", "content-length", "cookie"}

# The claims a session keeps: what the headers and later features need, nothing else.
KEPT_CLAIMS = ("sub", "preferred_username", "email", "name", "groups", "entitlements", "sid", "ak_proxy")


def _joined(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return "" if value is None else str(value)


def _claim(claims: dict[str, Any], key: str) -> str:
    return _joined(claims.get(key))


def as_fields(headers: "Iterable[tuple[str, str]]") -> HeaderFields:
    """Header pairs in mitmproxy's wire form, so a request gets them in one tuple concatenation.
    Names and empty values are shared between sessions."""
    return tuple((shared(name.encode()), shared(value.encode("utf-8", "surrogateescape")) if not value else
                  value.encode("utf-8", "surrogateescape")) for name, value in headers)


def user_headers(claims: dict[str, Any], raw_token: str, legacy: bool) -> HeaderFields:
    """The per-user identity headers, every one present even when empty (so proxies overwrite)."""
    username = _claim(claims, "preferred_username") or _claim(claims, "sub")
    headers = [
        (names.USERNAME, username),
        (names.GROUPS, _claim(claims, "groups")),
        (names.ENTITLEMENTS, _claim(claims, "entitlements")),
        (names.EMAIL, _claim(claims, "email")),
        (names.NAME, _claim(claims, "name")),
        (names.UID, _claim(claims, "sub")),
        (names.JWT, raw_token),
    ]
    if legacy:
        headers += [(header, username if claim == "preferred_username" else _claim(claims, claim))
                    for header, claim in names.LEGACY_HEADERS.items()]
    return as_fields((name, _safe_value(value)) for name, value in headers)


def _safe_value(value: str) -> str:
    """Header values from an IdP must not smuggle line breaks into the upstream request."""
    return "".join(c for c in value if c >= " " or c == "\t").strip()


def kept_claims(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: claims[k] for k in KEPT_CLAIMS if k in claims}


def build_session(provider: "Provider", claims: dict[str, Any], raw_token: str, id_token: str, legacy: bool,
                  lifetime: float | None = None) -> Session:
    """A session from verified claims: identity headers, `ak_proxy` extras, Basic upstream."""
    kept = kept_claims(claims)
    ak_proxy = kept.get("ak_proxy") if isinstance(kept.get("ak_proxy"), dict) else {}
    attributes = ak_proxy.get("user_attributes") if isinstance(ak_proxy.get("user_attributes"), dict) else {}
    who = f"provider {provider.name}: user {kept.get('preferred_username') or kept.get('sub')}"
    extra = additional_headers(attributes.get("additionalHeaders"), provider.basic_auth is not None, who)
    if provider.basic_auth is not None:
        extra += basic_upstream(attributes, kept, provider.basic_auth, who)
    backend, backend_error = _backend(ak_proxy, who)
    return Session.of(
        provider=provider.name,
        sub=str(claims["sub"]),
        headers=user_headers(kept, raw_token, legacy) + extra,
        # With Basic upstream on, Authorization towards the app is the outpost's alone.
        replaces=shared(frozenset({b"host"} | {name.lower() for name, _ in extra}
                                  | ({b"authorization"} if provider.basic_auth else set()))),
        expires_at=time.time() + (lifetime or provider.session_lifetime),
        idp_sid=str(claims.get("sid") or ""),
        id_token=id_token if id_token != raw_token else "",
        backend=backend,
        backend_error=backend_error,
    )


def basic_upstream(attributes: dict[str, Any], claims: dict[str, Any], names_: tuple[str, str],
                   who: str) -> HeaderFields:
    """`Authorization: Basic` for the upstream from the user's attributes; none without a password."""
    user_attribute, password_attribute = names_
    password = attributes.get(password_attribute)
    user = attributes.get(user_attribute) if user_attribute else None
    user = user if isinstance(user, str) and user else claims.get("email")
    if not isinstance(password, str) or not password or not isinstance(user, str) or not user:
        logger.warning("%s: no HTTP Basic credentials for the upstream (attribute %r or the user name is missing)",
                       who, password_attribute)
        return ()
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return as_fields([("Authorization", f"Basic {credentials}")])


def additional_headers(value: Any, basic_upstream_on: bool, who: str) -> HeaderFields:
    """`user_attributes.additionalHeaders`: static extra headers, never ones that carry identity,
    control the connection, or alias another name (`_`, the CVE-2025-64484 class)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        logger.warning("%s: additionalHeaders is not a mapping; ignored", who)
        return ()
    accepted = []
    for name, raw in value.items():
        key = names.header_key(str(name))
        text = (raw if isinstance(raw, str)
                else json.dumps(raw) if not isinstance(raw, (int, float)) or isinstance(raw, bool) else str(raw))
        refused = (
            not isinstance(name, str) or not _TOKEN.match(name) or "_" in name
            or key in names.PROTECTED_HEADER_KEYS or key.startswith(names.PROTECTED_HEADER_PREFIXES)
            or key in NOT_ADDITIONAL or (key == "authorization" and basic_upstream_on) or has_control_chars(text)
        )
        if refused:
            logger.warning("%s: additional header %r refused", who, name)
        else:
            accepted.append((name, text))
    return as_fields(accepted)


def _backend(ak_proxy: dict[str, Any], who: str) -> tuple[tuple[str, str, int, str] | None, str]:
    """(scheme, host, port, Host header) for this user, or why the claims cannot be honoured."""
    override, host_header = ak_proxy.get("backend_override"), ak_proxy.get("host_header")
    if override is None and host_header is None:
        return None, ""
    error = ""
    scheme, host, port = "", "", 0
    if override is not None:
        try:
            url = ada_url.URL(override) if isinstance(override, str) and not has_control_chars(override) else None
        except ValueError:
            url = None
        if url is None or url.protocol not in HTTP_SCHEMES or not url.hostname or url.username or url.password:
            error = f"backend_override {str(override)[:100]!r} is not an http(s) URL"
        else:
            scheme = url.protocol.rstrip(":")
            host, port = url.hostname, int(url.port or (443 if scheme == "https" else 80))
    if host_header is not None and not error and (not isinstance(host_header, str) or not _HOST.match(host_header)):
        error = f"host_header {str(host_header)[:100]!r} is not a host"
    if error:
        logger.warning("%s: %s; their requests will be refused", who, error)
        return None, error
    return (scheme, host, port, host_header or ""), ""
