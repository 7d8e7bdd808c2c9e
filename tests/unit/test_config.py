from pathlib import Path

import pytest

from mitm_outpost import config_schema as config
from mitm_outpost.config_schema import ConfigError
from tests.unit.conftest import make_provider

BASE = {"name": "app", "external_host": "http://a.test", "internal_host": "http://b.test", "client_id": "c", "issuer": "http://i.test"}


def parse(**fields: object) -> dict:
    return config.parse({"providers": [{**BASE, **fields}]}).providers[0]


def test_defaults_follow_authentik() -> None:
    values = parse()
    assert values["mode"] == "proxy" and values["intercept_header_auth"] is True
    assert (values["internal_host_ssl_validation"] is True
            and values["scopes_to_request"] == ["openid", "profile", "email"])


@pytest.mark.parametrize("fields, message", [
    ({"nope": 1}, "provider 'app': unknown field 'nope'"),
    ({"basic_auth_enabled": "true"}, "field 'basic_auth_enabled': expected bool, got str"),
    ({"access_token_validity": -1}, "field 'access_token_validity': must be a positive number"),
    ({"mode": "forward_domain"}, "field 'cookie_domain': required in forward_domain mode"),
    ({"internal_host": ""}, "field 'internal_host': required in proxy mode"),
    ({"scopes_to_request": ["profile"]}, "must include 'openid'"),
    ({"issuer": ""}, "field 'issuer': required"),
    ({"basic_auth_enabled": True}, "field 'basic_auth_password_attribute': required"),
])
def test_each_mistake_names_provider_and_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(**fields)


def test_top_level_mistakes() -> None:
    for doc, message in ((None, "top level must be a mapping"), ({"providers": {}}, "non-empty list"),
                         ({"providers": [BASE], "extra": 1}, "top level: unknown field 'extra'"),
                         ({"providers": [BASE, BASE]}, "another provider already has this name")):
        with pytest.raises(ConfigError, match=message):
            config.parse(doc)


def test_env_and_file_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_SECRET", "from-env")
    assert parse(client_secret="${APP_SECRET}")["client_secret"] == "from-env"
    (tmp_path / "s").write_text("from-file\n")
    assert config.parse({"providers": [{**BASE, "client_secret_file": "s"}]},
                        base=tmp_path).providers[0]["client_secret"] == "from-file"
    with pytest.raises(ConfigError, match="give either 'client_secret' or 'client_secret_file'"):
        config.parse({"providers": [{**BASE, "client_secret": "x", "client_secret_file": "s"}]}, base=tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        config.parse({"providers": [{**BASE, "client_secret_file": "missing"}]}, base=tmp_path)


def test_authentik_export_fields_are_accepted() -> None:
    values = parse(pk=7, assigned_application_slug="grafana",
                   oidc_configuration={"issuer": "http://i.test", "token_endpoint": "http://i.test/t"})
    assert values["token_endpoint"] == "http://i.test/t"


def test_provider_precomputes_the_hot_path() -> None:
    p = make_provider(cookie_domain=".example.test")
    assert p.cookie_name == "authentik_proxy_" + __import__("hashlib").sha256(b"app-client").hexdigest()[:8]
    assert p.cookie_attributes == "Path=/; Domain=example.test; HttpOnly; SameSite=Lax; Secure"
    assert p.redirect_uri == "https://app.example.test/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
    assert p.host_keys == ("app.example.test", "app.example.test:443")
    assert p.backend is not None and (p.backend.scheme, p.backend.host, p.backend.port) == ("http", "10.0.0.5", 8080)


def test_cookie_name_vectors_from_the_spec() -> None:
    from mitm_outpost.names import cookie_name

    assert cookie_name("abc") == "authentik_proxy_ba7816bf"
    assert cookie_name("client-123") == "authentik_proxy_b44ea687"


def test_skip_rules_are_one_re2_program_without_blank_lines() -> None:
    p = make_provider(skip_path_regex="^/health$\r\n\n  \n/static/")
    assert p.is_skipped("/health") and p.is_skipped("/a/static/x")
    assert not p.is_skipped("/") and not p.is_skipped("/healthz")
    with pytest.raises(ConfigError, match=r"line 2 '\(\?<=a\)b'"):
        make_provider(skip_path_regex="^/ok\n(?<=a)b")
