"""AuthentikSource: the settings it reads from the environment, and how the answers of an authentik API turn
into providers. The API is the contract double of tests/support/authentik_api.py, a real HTTP server on a
loopback port in a thread; the addon runs in the production chain (`chain.build`). authentik's proxy providers
sign ID tokens with HS256 and their oidc_configuration names every endpoint, so nothing else is dialled."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from mitm_outpost import chain, names
from mitm_outpost.authentik import USER_AGENT, Api, AuthentikSource, InvalidToken, Settings
from mitm_outpost.identity import user_headers
from mitm_outpost.registry import Registry
from mitm_outpost.sessions import Session
from tests.support.authentik_api import AuthentikAPIDouble, hash_session_key, make_provider, self_signed_certificate

KEYPAIR = "5f8a6bd4-8f0b-4a43-9a55-2a4c7cf0a001"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[AuthentikAPIDouble]:
    with AuthentikAPIDouble(outpost_name="edge-outpost", max_page_size=2) as double:
        monkeypatch.setenv("AUTHENTIK_HOST", double.url)
        monkeypatch.setenv("AUTHENTIK_TOKEN", double.token)
        for name in ("AUTHENTIK_INSECURE", "AUTHENTIK_HOST_BROWSER"):
            monkeypatch.delenv(name, raising=False)
        yield double


@contextlib.asynccontextmanager
async def outpost(registry: Registry, tmp_path: Path) -> AsyncIterator[tuple[taddons.context, AuthentikSource, Api]]:
    """The chain configured as at start without a mitm_config.yaml; the source's API client."""
    built = chain.build(registry, interactive=False)
    with taddons.context(Proxyserver(), built) as tctx:  # Proxyserver: the options Listeners sets
        tctx.options.update(confdir=str(tmp_path), outpost_config=str(tmp_path / "absent.yaml"))
        source = next(a for a in built.members if isinstance(a, AuthentikSource))
        assert source.settings is not None
        client = Api(source.settings)
        try:
            yield tctx, source, client
        finally:
            await client.aclose()


def providers() -> list[dict]:
    return [
        make_provider("App One", "https://one.example.test", "http://10.0.0.5:8080", client_id="one-client",
                      client_secret="one-secret", skip_path_regex="^/health$", access_token_validity=3600.0),
        make_provider("Check", "https://check.example.test", mode="forward_single", client_id="check-client"),
        make_provider("Domain", "https://auth.corp.example.test", mode="forward_domain", client_id="domain-client",
                      cookie_domain="corp.example.test"),
    ]


async def test_the_environment_makes_the_settings_and_the_outpost_unready_until_providers_come(
        api: AuthentikAPIDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_HOST", api.url + "sub/?tenant=blue")
    monkeypatch.setenv("AUTHENTIK_INSECURE", "true")
    monkeypatch.setenv("AUTHENTIK_HOST_BROWSER", "https://auth.example.com")
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, _):
        assert source.settings == Settings(host=api.url + "sub/", token=api.token, insecure=True,
                                           host_browser="https://auth.example.com", query="tenant=blue")
        assert registry.ready is False and registry.is_ready() is False


async def test_without_the_environment_there_is_no_authentik_source(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTHENTIK_HOST", raising=False)
    monkeypatch.delenv("AUTHENTIK_TOKEN", raising=False)
    registry = Registry()
    built = chain.build(registry, interactive=False)
    with taddons.context(Proxyserver(), built) as tctx:  # Proxyserver: the options Listeners sets
        tctx.options.update(confdir=str(tmp_path), outpost_config=str(tmp_path / "absent.yaml"))
        source = next(a for a in built.members if isinstance(a, AuthentikSource))
        source.running()
        assert (source.settings, source.tasks, registry.ready) == (None, [], True)


async def test_the_api_s_providers_become_the_outpost_s(api: AuthentikAPIDouble, tmp_path: Path) -> None:
    api.set_providers(providers())
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        await source.refresh(client)
    assert (registry.ready, registry.outpost_name, registry.outpost_uuid) == (True, "edge-outpost", api.outpost_pk)
    assert [(p.name, p.mode.value, p.external_origin, p.cookie_domain) for p in registry.providers] == [
        ("App One", "proxy", "https://one.example.test", ""),  # authentik lists them by name
        ("Check", "forward_single", "https://check.example.test", ""),
        ("Domain", "forward_domain", "https://auth.corp.example.test", "corp.example.test"),
    ]
    assert list(registry.sources) == ["authentik"]
    one = registry.by_name["App One"]
    assert (one.backend.scheme, one.backend.host, one.backend.port) == ("http", "10.0.0.5", 8080)
    assert (one.client_id, one.cookie_name, one.session_lifetime) == (
        "one-client", names.cookie_name("one-client"), 3600)
    assert one.scope == "openid profile email entitlements ak_proxy"
    assert (one.is_skipped("/health"), one.is_skipped("/private")) == (True, False)
    assert (one.idp.issuer, one.idp.authorization_endpoint, one.idp.token_endpoint, one.idp.algorithms) == (
        "http://authentik.test/application/o/app-one/", "http://authentik.test/application/o/authorize/",
        "http://authentik.test/application/o/token/", frozenset({"HS256"}))
    assert one.idp.end_session_endpoint == "http://authentik.test/application/o/app-one/end-session/"
    assert dict(one.static_headers)[names.META_APP.encode()] == b"app-one"  # assigned_application_slug
    assert dict(one.static_headers)[names.META_OUTPOST.encode()] == b"edge-outpost"


async def test_every_page_of_the_provider_list_is_read_with_the_outpost_s_token(api: AuthentikAPIDouble,
                                                                               tmp_path: Path) -> None:
    api.set_providers([make_provider(f"app{n}", f"https://app{n}.example.test", "http://10.0.0.5:8080")
                       for n in range(5)])
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        await source.refresh(client)
    assert [p.name for p in registry.providers] == ["app0", "app1", "app2", "app3", "app4"]
    pages = api.received("/api/v3/outposts/proxy/")
    assert [(r.query["page"], r.query["page_size"]) for r in pages] == [(["1"], ["100"]), (["2"], ["100"]),
                                                                        (["3"], ["100"])]
    assert {(r.headers["authorization"], r.headers["user-agent"]) for r in pages} == {
        (f"Bearer {api.token}", USER_AGENT)}


async def test_host_browser_changes_only_the_browser_facing_urls(api: AuthentikAPIDouble, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHENTIK_HOST_BROWSER", "https://auth.example.com")
    api.set_providers(providers()[:1])
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        await source.refresh(client)
    idp = registry.by_name["App One"].idp
    assert (idp.issuer, idp.authorization_endpoint, idp.end_session_endpoint) == (
        "https://auth.example.com/application/o/app-one/", "https://auth.example.com/application/o/authorize/",
        "https://auth.example.com/application/o/app-one/end-session/")
    assert idp.token_endpoint == "http://authentik.test/application/o/token/"  # the back channel stays


async def test_a_provider_that_cannot_be_built_is_dropped_and_the_others_served(
        api: AuthentikAPIDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api.set_providers([*providers()[:2], make_provider("Broken", "https://broken.example.test", "http://10.0.0.6",
                                                       skip_path_regex="^/ok$\n(unclosed")])
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        with caplog.at_level(logging.ERROR, "mitm_outpost"):
            await source.refresh(client)
    assert [p.name for p in registry.providers] == ["App One", "Check"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "authentik provider 'Broken' dropped: provider 'Broken': field 'skip_path_regex': line 2 '(unclosed': "
        "missing ): (unclosed"]


async def test_a_refused_token_is_an_error_of_its_own(api: AuthentikAPIDouble, tmp_path: Path) -> None:
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, _):
        wrong = Api(Settings(host=api.url, token="wrong-token", insecure=False, host_browser=""))
        try:
            with pytest.raises(InvalidToken) as refused:
                await source.refresh(wrong)
        finally:
            await wrong.aclose()
    assert str(refused.value) == f"authentik refused the token (403) at {api.url}api/v3/outposts/instances/"
    assert registry.ready is False


async def test_a_failed_refresh_keeps_the_last_good_providers(api: AuthentikAPIDouble, tmp_path: Path) -> None:
    api.set_providers(providers())
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        await source.refresh(client)
        good = registry.current
        api.set_down()
        with pytest.raises(Exception, match="503"):
            await source.refresh(client)
        api.set_down(False)
        api.set_broken_json()
        with pytest.raises(ValueError, match="did not answer JSON"):
            await source.refresh(client)
    assert registry.current is good and registry.ready is True


async def test_a_provider_s_certificate_is_fetched_once_and_served_for_its_host(api: AuthentikAPIDouble,
                                                                              tmp_path: Path) -> None:
    cert, key, fingerprint = self_signed_certificate("one.example.test")
    api.add_certificate(KEYPAIR, cert, key)
    api.set_providers([make_provider("App One", "https://one.example.test", "http://10.0.0.5:8080",
                                     certificate=KEYPAIR), *providers()[1:2]])
    registry = Registry()
    async with outpost(registry, tmp_path) as (tctx, source, client):
        await source.refresh(client)
        path = tmp_path / f"authentik-{KEYPAIR}-{fingerprint[:16]}.pem"
        assert registry.by_name["App One"].certificate == str(path)
        assert path.read_text() == key.strip() + "\n" + cert.strip() + "\n"
        assert path.stat().st_mode & 0o777 == 0o600
        # the listeners follow the new set: the fallback for every host, the provider's own for its host
        assert tctx.options.certs == [f"*={tmp_path / 'outpost-default-cert.pem'}", f"one.example.test={path}"]
        await source.refresh(client)
    assert api.certificate_fetches(KEYPAIR) == {"keypair": 2, "certificate": 1, "private_key": 1}


async def test_the_websocket_says_hello_and_ends_sessions_authentik_ended(api: AuthentikAPIDouble,
                                                                         tmp_path: Path) -> None:
    api.set_providers(providers()[:1])
    registry = Registry()
    async with outpost(registry, tmp_path) as (_, source, client):
        await source.refresh(client)
        ended = asyncio.Event()
        delete = registry.store.delete_idp_session

        async def delete_and_tell(idp_sid: str) -> int:
            count = await delete(idp_sid)
            ended.set()
            return count

        registry.store.delete_idp_session = delete_and_tell  # type: ignore[method-assign]
        idp_sid = hash_session_key("django-session-key")
        headers = user_headers({"sub": "u1", "preferred_username": "alice"}, "tok", True)
        await registry.store.put("sid-1", Session.of(provider="App One", sub="u1", headers=headers, idp_sid=idp_sid,
                                                     expires_at=time.time() + 60))
        socket = asyncio.create_task(source.websocket_loop())
        try:
            await asyncio.to_thread(api.wait_for_hellos, 1)
            assert (api.hellos[0]["uuid"], api.hellos[0]["version"]) == (source.instance, registry.authentik_release)
            assert api.ws_clients[0].query["instance_uuid"] == [source.instance]
            assert api.send_session_end(idp_sid) == 1
            await asyncio.wait_for(ended.wait(), 10)
        finally:
            socket.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await socket
    assert await registry.store.get("App One", "sid-1") is None
