"""The debugging commands and content views, through mitmproxy's own test helpers."""

import asyncio
import json
import time

import jwt
import pytest
from mitmproxy import contentviews
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost.debugging import Commands, IdentityView, JwtView
from mitm_outpost.registry import Registry


def token(exp_offset: int = 300, key: str = "s3cret") -> str:
    now = int(time.time())
    return jwt.encode({"iss": "https://idp.example.test", "sub": "u1", "iat": now, "exp": now + exp_offset}, key,
                      algorithm="HS256")


def metadata(registry: Registry, body: bytes = b"", **headers: str) -> contentviews.Metadata:
    flow = tflow.tflow(req=tutils.treq(headers=()))
    for k, v in headers.items():
        flow.request.headers[k] = v
    flow.request.content = body
    flow.metadata["outpost"] = {"provider": registry.providers[0].name, "outcome": "allowed",
                                "reason": "session of alice",
                                "stripped_headers": "X-authentik-username, X_Authentik_Groups"}
    return contentviews.Metadata(flow=flow, http_message=flow.request)


@pytest.mark.parametrize("jwt_token, verdict", [
    (token(), "valid (HS256, app's issuer)"),
    (token(-3600), "but EXPIRED"),
    (token(key="forged"), "INVALID for app's issuer"),
])
def test_jwt_view_decodes_and_checks_tokens(registry: Registry, jwt_token: str, verdict: str) -> None:
    view = JwtView(registry)
    meta = metadata(registry, f"id_token={jwt_token}".encode(), **{"X-authentik-jwt": jwt_token})
    text = view.prettify(meta.http_message.content, meta)
    assert "# header X-authentik-jwt" in text and "# body" in text and verdict in text
    assert "UTC" in text and '"sub": "u1"' in text
    assert view.render_priority(meta.http_message.content, meta) > 0
    assert view.render_priority(b"{}", meta) < 0


def test_identity_view_shows_what_went_upstream_and_what_was_dropped(registry: Registry) -> None:
    meta = metadata(registry, **{"X-authentik-username": "alice", "X-Forwarded-For": "127.0.0.1", "Accept": "*/*"})
    text = IdentityView().prettify(b"", meta)
    assert "X-authentik-username: alice" in text and "X-Forwarded-For: 127.0.0.1" in text and "Accept" not in text
    assert "X_Authentik_Groups" in text and "decision: allowed" in text


async def test_commands(registry: Registry) -> None:
    p = registry.providers[0]
    commands = Commands(registry)
    with taddons.context(commands) as tctx:
        assert "app: proxy at https://app.example.test -> http://10.0.0.5:8080" in tctx.command(commands.providers)
        config = json.loads(tctx.command(commands.config))
        assert config["providers"][0]["client_secret"] == "***" and config["providers"][0]["client_id"] == "app-client"
        with pytest.raises(ValueError, match="outpost_debug_login"):
            tctx.command(commands.login_as, "app", "mallory")
        tctx.configure(commands, outpost_debug_login=True)
        cookie = tctx.command(commands.login_as, "app", "mallory")
        assert cookie.startswith(f"Cookie: {p.cookie_name}=")
        await asyncio.sleep(0)
        assert "app: mallory (uid mallory)" in tctx.command(commands.sessions)
        assert tctx.command(commands.sessions, "other") == "no sessions"
        assert "ending the sessions of mallory" in tctx.command(commands.revoke, "mallory")
        await asyncio.sleep(0)
        assert tctx.command(commands.sessions) == "no sessions"


def test_lean_runner_has_no_debugging_commands() -> None:
    from mitm_outpost import chain

    assert not [a for a in chain.build(interactive=False).members if isinstance(a, Commands)]
    assert [a for a in chain.build().members if isinstance(a, Commands)]
