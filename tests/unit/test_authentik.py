from pathlib import Path

import pytest

from mitm_outpost.authentik import Settings, browser_facing, describe, env_value
from mitm_outpost.listeners import listen_env


def test_env_indirections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("AUTHENTIK_TOKEN", f"file://{tmp_path}/token")
    assert env_value("AUTHENTIK_TOKEN") == "from-file"
    monkeypatch.setenv("OTHER", "from-env")
    monkeypatch.setenv("AUTHENTIK_TOKEN", "env://OTHER")
    assert env_value("AUTHENTIK_TOKEN") == "from-env"


def test_settings_need_both_or_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTHENTIK_HOST", raising=False)
    monkeypatch.delenv("AUTHENTIK_TOKEN", raising=False)
    assert Settings.from_env() is None
    monkeypatch.setenv("AUTHENTIK_TOKEN", "t")
    with pytest.raises(SystemExit, match="AUTHENTIK_HOST is not set"):
        Settings.from_env()
    monkeypatch.setenv("AUTHENTIK_HOST", "https://ak.example.test/sub?x=1")
    monkeypatch.setenv("AUTHENTIK_INSECURE", "true")
    settings = Settings.from_env()
    assert settings is not None and settings.insecure and settings.websocket_base == "wss://ak.example.test/sub/"
    assert settings.host == "https://ak.example.test/sub/" and settings.query == "x=1"


def test_browser_facing_urls_follow_host_browser() -> None:
    doc = {"issuer": "http://ak-internal:9000/application/o/app/", "authorization_endpoint": "http://ak-internal:9000/application/o/authorize/",
           "token_endpoint": "http://ak-internal:9000/application/o/token/", "end_session_endpoint": "http://ak-internal:9000/application/o/app/end-session/"}
    out = browser_facing(doc, "https://auth.example.com")
    assert out["authorization_endpoint"] == "https://auth.example.com/application/o/authorize/"
    assert out["issuer"] == "https://auth.example.com/application/o/app/"
    assert out["token_endpoint"] == doc["token_endpoint"]  # back channel unchanged


def test_listen_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTP", "[::]:9100")
    assert listen_env("AUTHENTIK_LISTEN__HTTP", 9000) == ("", 9100)
    monkeypatch.setenv("AUTHENTIK_LISTEN__HTTP", "127.0.0.1:8000,[::1]:8000")
    assert listen_env("AUTHENTIK_LISTEN__HTTP", 9000) == ("127.0.0.1", 8000)
    assert describe(ValueError("first line\nsecond")) == "first line"
