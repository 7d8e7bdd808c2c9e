"""From verified claims to the headers the upstream receives. Computed once, at login."""

from collections.abc import Iterable
from typing import Any

from . import names

# The claims a session keeps: what the headers and later features need, nothing else.
KEPT_CLAIMS = ("sub", "preferred_username", "email", "name", "groups", "entitlements", "sid", "ak_proxy")


def _joined(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return "" if value is None else str(value)


def _claim(claims: dict[str, Any], key: str) -> str:
    return _joined(claims.get(key))


HeaderFields = tuple[tuple[bytes, bytes], ...]


def as_fields(headers: "Iterable[tuple[str, str]]") -> HeaderFields:
    """Header pairs in mitmproxy's wire form, so a request gets them in one tuple concatenation."""
    return tuple((name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in headers)


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
        headers += [(header, username if claim == "preferred_username" else _claim(claims, claim)) for header, claim in names.LEGACY_HEADERS.items()]
    return as_fields((name, _safe_value(value)) for name, value in headers)


def _safe_value(value: str) -> str:
    """Header values from an IdP must not smuggle line breaks into the upstream request."""
    return "".join(c for c in value if c >= " " or c == "\t").strip()


def kept_claims(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: claims[k] for k in KEPT_CLAIMS if k in claims}
