"""Forward auth's view of the original request, rebuilt from what each reverse proxy really sends.

Pure functions, no I/O. The original URL comes from headers, so it is hostile: it is parsed
with ada (as a browser would), its path is normalised once before any rule sees it, and a
path that different servers could read differently (encoded slashes, `;`, backslashes) is
reported as ambiguous so that nothing URL-based can let it through.
"""

import functools
import re
import string
from dataclasses import dataclass
from enum import StrEnum

import ada_url
from mitmproxy import http

from . import names
from .urls import HTTP_SCHEMES, has_control_chars


class ProxyKind(StrEnum):
    NGINX = "nginx"
    TRAEFIK = "traefik"
    CADDY = "caddy"
    ENVOY = "envoy"


# Where each kind asks (both prefixes), including seed 002's `/akprox/auth?nginx` spellings.
AUTH_PREFIX = f"{names.OUTPOST_PREFIX}{names.FORWARD_AUTH}/"
AUTH_PATHS = {
    f"{prefix}{names.FORWARD_AUTH}/{kind.value}": kind for prefix in names.ENDPOINT_PREFIXES for kind in ProxyKind
}
LEGACY_QUERY_PATH = names.LEGACY_PREFIX + names.FORWARD_AUTH
LEGACY_QUERY_KINDS = (ProxyKind.NGINX.value, ProxyKind.TRAEFIK.value)
ENVOY_PREFIX = f"{AUTH_PREFIX}{ProxyKind.ENVOY.value}"

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_AMBIGUOUS = ("%2F", "%5C", "\\", ";")


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The request the reverse proxy is asking about."""

    url: str  # serialised by ada; "" when the proxy did not send enough to know it
    host: str  # host[:port] as the browser used it ("" when unknown)
    hostname: str
    path: str | None  # normalised path, None when unknown or ambiguous
    normal: bool = False  # the path as the proxy forwards it (raw) is already normal: the rules may judge it

    @property
    def query(self) -> str:
        """The original query, without `?`: where authentik looks for the callback and sign-out markers."""
        return self.url.partition("#")[0].partition("?")[2]

    @property
    def origin_url(self) -> str:
        """scheme://host/path without the query: what domain-level skip rules test."""
        if not self.url or self.path is None:
            return ""
        url = ada_url.URL(self.url)
        return f"{url.protocol}//{url.host}{self.path}"


def auth_kind(path: str, query: str) -> ProxyKind | None:
    """Which forward-auth endpoint a request path names, if any."""
    if path.startswith(ENVOY_PREFIX) and (len(path) == len(ENVOY_PREFIX) or path[len(ENVOY_PREFIX)] == "/"):
        return ProxyKind.ENVOY
    if path == LEGACY_QUERY_PATH and query in LEGACY_QUERY_KINDS:
        return ProxyKind(query)
    if path.lower().startswith(LEGACY_QUERY_PATH + "%3f") and path[len(LEGACY_QUERY_PATH) + 3:] in LEGACY_QUERY_KINDS:
        # nginx escapes the `?` of `auth_request /akprox/auth?nginx`
        return ProxyKind(path[len(LEGACY_QUERY_PATH) + 3:])
    return AUTH_PATHS.get(path)


def normalise_path(raw: str) -> str | None:
    """Decode unreserved percent-escapes, resolve dot segments, fold repeated slashes.

    Returns None for a path servers disagree about, so no skip rule can match it."""
    if not raw.startswith("/") or has_control_chars(raw):
        return None
    decoded = _PERCENT.sub(lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in _UNRESERVED else "%" + m[1].upper(),
                           raw)
    if any(marker in decoded for marker in _AMBIGUOUS):
        return None
    segments: list[str] = []
    parts = decoded.split("/")[1:]
    for index, segment in enumerate(parts):
        last = index == len(parts) - 1
        if segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif segment == ".":
            if last:
                segments.append("")
        elif segment or last:
            segments.append(segment)
    return "/" + "/".join(segments)


def original_request(kind: ProxyKind, request: http.Request, path: str, query: str) -> OriginalRequest:
    """Rebuild the original request from the headers `kind` sends (spec §4.3-§4.5)."""
    headers = request.headers
    host_header = headers.get("Host", "")
    if kind is ProxyKind.NGINX:
        host = headers.get(names.FORWARDED_HOST) or host_header  # seed 002's config sends only that
        if uri := headers.get(names.ORIGINAL_URI):
            scheme = headers.get(names.FORWARDED_PROTO, "http")
            return _build(scheme, host, uri)
        if url := headers.get(names.ORIGINAL_URL):
            return parse_original_url(url)
        return _build_host_only(host)
    if kind is ProxyKind.ENVOY:
        rest = path[len(ENVOY_PREFIX):] or "/"
        return _build(headers.get(names.FORWARDED_PROTO, "http"), host_header, rest + (f"?{query}" if query else ""))
    proto, fhost, uri = (headers.get(h, "") for h in (names.FORWARDED_PROTO, names.FORWARDED_HOST, names.FORWARDED_URI))
    if not (proto and fhost and uri):
        return _build_host_only(fhost or host_header)
    return _build(proto, fhost, uri)


def _build(scheme: str, host: str, uri: str) -> OriginalRequest:
    if not uri.startswith("/"):
        return _build_host_only(host)
    return parse_original_url(f"{scheme}://{host}{uri}", raw_path=uri.split("?", 1)[0])


MEMO_URL_LENGTH = 2048  # longer URLs are parsed each time, never kept


def parse_original_url(value: str, raw_path: str | None = None) -> OriginalRequest:
    """A full URL sent by a proxy (X-Original-URL), judged as a browser would parse it.

    A reverse proxy asks about the same few URLs over and over (a page, its assets), and the
    judgement is a pure function of the two strings: remembered for the last 1024 of them."""
    if len(value) > MEMO_URL_LENGTH:
        return _judge_original_url(value, raw_path)
    return _remembered_original_url(value, raw_path)


def _judge_original_url(value: str, raw_path: str | None) -> OriginalRequest:
    if has_control_chars(value):
        return OriginalRequest("", "", "", None)
    try:
        url = ada_url.URL(value)
    except ValueError:
        return OriginalRequest("", "", "", None)
    if url.protocol not in HTTP_SCHEMES or not url.hostname:
        return OriginalRequest("", "", "", None)
    if raw_path is None:  # a full URL: its raw path is what follows the authority
        after_scheme = value.split("://", 1)[1] if "://" in value else ""
        slash = after_scheme.find("/")
        raw_path = after_scheme[slash:].split("?", 1)[0].split("#", 1)[0] if slash >= 0 else "/"
    path = normalise_path(raw_path)
    return OriginalRequest(url.href, url.host, url.hostname, path, path is not None and path == raw_path)


_remembered_original_url = functools.lru_cache(maxsize=1024)(_judge_original_url)


def _build_host_only(host: str) -> OriginalRequest:
    """Only the host is known (nginx passing just `Host`): enough to find the provider, nothing more."""
    if not host or has_control_chars(host):
        return OriginalRequest("", "", "", None)
    try:
        url = ada_url.URL(f"http://{host}/")
    except ValueError:
        return OriginalRequest("", "", "", None)
    return OriginalRequest("", url.host, url.hostname, None)
