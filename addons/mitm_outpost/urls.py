"""Judging URLs a browser will follow. Pure functions, no I/O.

Every URL is parsed with ada (the WHATWG parser browsers implement), so what we check is
what the browser will do: `/\\evil.com`, tabs inside `//`, `https:evil.com` and friends all
resolve to their real host before the host is compared.
"""

import re
import urllib.parse

import ada_url

HTTP_SCHEMES = ("http:", "https:")


def parse_origin_url(value: str) -> ada_url.URL:
    """Parse an `external_host`-like URL: http(s), a host, no credentials, no path, query or fragment."""
    url = ada_url.URL(value)
    if url.protocol not in HTTP_SCHEMES or not url.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url.username or url.password or url.pathname not in ("", "/") or url.search or url.hash:
        raise ValueError("must be scheme://host[:port] only (no path, query, fragment or credentials)")
    return url


def origin(url: ada_url.URL) -> str:
    return f"{url.protocol}//{url.host}"


def host_keys(url: ada_url.URL) -> tuple[str, ...]:
    """The Host header values a browser sends for this origin (with and without a default port)."""
    default_port = "443" if url.protocol == "https:" else "80"
    return (url.host, f"{url.hostname}:{default_port}") if not url.port else (url.host,)


_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def has_control_chars(value: str) -> bool:
    return _CONTROL_CHAR.search(value) is not None


def safe_redirect(rd: str, external_origin: str, domain: str = "") -> str | None:
    """The absolute URL to send the browser to after login, or None when `rd` is not ours.

    Relative values are resolved against the provider's origin; the result must have
    exactly that scheme and host:port (or, with `domain`, that scheme and a hostname equal
    to the domain or ending in `.domain`) and no credentials. Control characters, backslashes and a
    leading `//` are refused outright, raw or percent-decoded once: browsers and servers
    strip or reinterpret them.
    """
    if not rd or len(rd) > 8192:
        return None
    for form in (rd, urllib.parse.unquote(rd)):  # also as a server that decodes once would see it
        if has_control_chars(form) or "\\" in form or form.startswith("//"):
            return None
    try:
        url = ada_url.URL(rd, base=external_origin + "/")
    except ValueError:
        return None
    if url.username or url.password:
        return None
    if domain:
        hostname = url.hostname.lower()
        inside = hostname == domain or hostname.endswith("." + domain)
        if not inside or url.protocol != external_origin.split("//", 1)[0]:
            return None
    elif origin(url) != external_origin:
        return None
    return url.href
