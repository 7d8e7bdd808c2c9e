import pytest
from mitmproxy.test import tutils

from mitm_outpost.forwarded import ProxyKind, auth_kind, normalise_path, original_request


@pytest.mark.parametrize("raw, expected", [
    ("/a/b", "/a/b"), ("/a//b", "/a/b"), ("//a", "/a"), ("/a/./b/../c", "/a/c"), ("/a/b/", "/a/b/"),
    ("/%2e%2e/admin", "/admin"), ("/public/%2E%2E/admin", "/admin"), ("/outpost.goauthentik.io/../admin", "/admin"),
    ("/%7Euser/%41", "/~user/A"), ("/a/..", "/"), ("/../../etc", "/etc"), ("/a%20b", "/a%20b"),
    ("/a%2Fb", None), ("/a%2fb", None), ("/a;b", None), ("/a%3Bb", "/a%3Bb"), ("/a\\b", None), ("/a%5cb", None),
    ("relative", None), ("/a\nb", None), ("", None),
])
def test_paths_are_normalised_once_or_refused(raw: str, expected: str | None) -> None:
    assert normalise_path(raw) == expected


@pytest.mark.parametrize("path, query, kind", [
    ("/outpost.goauthentik.io/auth/nginx", "", ProxyKind.NGINX),
    ("/outpost.goauthentik.io/auth/traefik", "", ProxyKind.TRAEFIK),
    ("/outpost.goauthentik.io/auth/caddy", "a=1", ProxyKind.CADDY),
    ("/outpost.goauthentik.io/auth/envoy/app/page", "", ProxyKind.ENVOY),
    ("/akprox/auth/nginx", "", ProxyKind.NGINX),
    ("/akprox/auth", "nginx", ProxyKind.NGINX),
    ("/akprox/auth", "traefik", ProxyKind.TRAEFIK),
    ("/akprox/auth%3Fnginx", "", ProxyKind.NGINX),  # what nginx really sends for seed 002's spelling
    ("/akprox/auth%3fnginx", "", ProxyKind.NGINX),
    ("/akprox/auth%3Fother", "", None),
    ("/outpost.goauthentik.io/auth/envoyx", "", None),
    ("/outpost.goauthentik.io/auth/nginx/", "", None),
    ("/outpost.goauthentik.io.x/auth/nginx", "", None),
])
def test_auth_endpoints_are_recognised_exactly(path: str, query: str, kind: ProxyKind | None) -> None:
    assert auth_kind(path, query) is kind


def _request(headers: dict[str, str]) -> object:
    req = tutils.treq(headers=())
    for k, v in headers.items():
        req.headers[k] = v
    return req


def test_nginx_original_url_and_uri() -> None:
    o = original_request(ProxyKind.NGINX,
                         _request({"Host": "app.test", "X-Original-URL": "https://app.test:8443/p/../admin?x=1"}),
                         "", "")
    assert (o.host, o.hostname, o.path) == ("app.test:8443", "app.test", "/admin")
    assert o.url == "https://app.test:8443/admin?x=1" and o.origin_url == "https://app.test:8443/admin"
    o = original_request(ProxyKind.NGINX, _request({"Host": "app.test", "X-Original-URI": "/a%2e%2e/x?q"}), "", "")
    assert o.url == "http://app.test/a%2e%2e/x?q" and o.path == "/a../x"
    host_only = original_request(ProxyKind.NGINX, _request({"Host": "app.test"}), "", "")
    assert (host_only.host, host_only.url, host_only.path) == ("app.test", "", None)


def test_traefik_needs_all_three_headers() -> None:
    full = {"Host": "outpost", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.test",
            "X-Forwarded-Uri": "/x?y=1"}
    o = original_request(ProxyKind.TRAEFIK, _request(full), "", "")
    assert o.url == "https://app.test/x?y=1" and o.path == "/x"
    partial = original_request(ProxyKind.CADDY, _request({**full, "X-Forwarded-Uri": ""}), "", "")
    assert partial.url == "" and partial.host == "app.test"
    for evil in ({"X-Forwarded-Proto": "javascript"}, {"X-Forwarded-Host": "app.test\r\nX: y"},
                 {"X-Forwarded-Uri": "//evil.test/"}):
        assert original_request(ProxyKind.TRAEFIK, _request({**full, **evil}), "", "").url in ("", "https://app.test//evil.test/")


def test_envoy_path_after_the_prefix() -> None:
    o = original_request(ProxyKind.ENVOY, _request({"Host": "app.test:10000"}),
                         "/outpost.goauthentik.io/auth/envoy/a/b", "q=1")
    assert o.url == "http://app.test:10000/a/b?q=1" and o.path == "/a/b"
