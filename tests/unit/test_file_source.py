"""FileSource: its options, and mitm_config.yaml turned into providers, trusted proxies and a session store,
at start and on a reload, through the production chain (`chain.build`). No network: the providers name their
endpoints and sign ID tokens with HS256 (no discovery, no JWKS)."""

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from mitm_outpost import chain
from mitm_outpost.file_source import FileSource
from mitm_outpost.redis_store import RedisStore
from mitm_outpost.registry import Registry
from mitm_outpost.sessions import MemoryStore


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTHENTIK_HOST", "AUTHENTIK_TOKEN", "OUTPOST_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def entry(name: str, external_host: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "external_host": external_host, "internal_host": "http://10.0.0.5:8080",
            "client_id": f"{name}-client", "client_secret": "s3cret", "issuer": "https://idp.example.test",
            "authorization_endpoint": "https://idp.example.test/authorize",
            "token_endpoint": "https://idp.example.test/token",
            "oidc_configuration": {"id_token_signing_alg_values_supported": ["HS256"]}, **fields}


def write(path: Path, *providers: dict[str, Any], **outpost: str) -> Path:
    path.write_text(yaml.safe_dump({"outpost": outpost, "providers": list(providers)} if outpost
                                   else {"providers": list(providers)}))
    return path


@contextlib.contextmanager
def outpost(registry: Registry, tmp_path: Path) -> Iterator[tuple[taddons.context, FileSource]]:
    built = chain.build(registry, interactive=False)
    with taddons.context(Proxyserver(), built) as tctx:  # Proxyserver: the options Listeners sets
        tctx.options.update(confdir=str(tmp_path / "confdir"))
        yield tctx, next(a for a in built.members if isinstance(a, FileSource))


def served(registry: Registry) -> list[tuple[str, str, str]]:
    return [(p.name, p.mode.value, p.external_origin) for p in registry.providers]


def test_the_options_and_their_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with outpost(Registry(), tmp_path) as (tctx, _):
        assert tctx.options.outpost_config == "mitm_config.yaml"
        assert tctx.options.trusted_proxies == ["127.0.0.0/8", "::1/128"]
        assert (tctx.options.outpost_log_decisions, tctx.options.outpost_legacy_headers) == (False, True)
    monkeypatch.setenv("OUTPOST_CONFIG", "/etc/outpost.yaml")
    with outpost(Registry(), tmp_path) as (tctx, _):
        assert tctx.options.outpost_config == "/etc/outpost.yaml"


def test_the_file_read_at_start_is_what_the_outpost_serves(tmp_path: Path) -> None:
    registry = Registry()
    path = write(tmp_path / "outpost.yaml",
                 entry("app", "https://app.example.test"),
                 entry("check", "http://check.example.test:8000", mode="forward_single", internal_host=""),
                 name="edge outpost")
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(outpost_config=str(path))
    assert registry.outpost_name == "edge outpost"
    assert served(registry) == [("app", "proxy", "https://app.example.test"),
                                ("check", "forward_single", "http://check.example.test:8000")]
    assert [p.name for p in registry.sources["file"]] == ["app", "check"]
    app = registry.by_name["app"]
    assert (app.backend.scheme, app.backend.host, app.backend.port) == ("http", "10.0.0.5", 8080)
    assert isinstance(registry.store, MemoryStore)


def test_a_path_with_a_tilde_is_read_from_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "outpost.yaml", entry("home", "https://home.example.test"))
    registry = Registry()
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(outpost_config="~/outpost.yaml")
    assert served(registry) == [("home", "proxy", "https://home.example.test")]


def test_a_bad_file_at_start_is_an_error_line_naming_provider_and_field(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """mitmproxy exits with status 1 on an error line before serving anything (its errorcheck addon)."""
    registry = Registry()
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test", mode="sideways"))
    with outpost(registry, tmp_path) as (tctx, _), caplog.at_level(logging.ERROR, "mitm_outpost"):
        tctx.options.update(outpost_config=str(path))
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mitm_outpost"] == [
        (logging.ERROR, f"configuration error: {path}: provider 'app': field 'mode': must be one of proxy, "
                        "forward_single, forward_domain")]
    assert registry.providers == ()


def test_a_missing_file_at_start_is_an_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with outpost(Registry(), tmp_path) as (tctx, _), caplog.at_level(logging.ERROR, "mitm_outpost"):
        tctx.options.update(outpost_config=str(tmp_path / "absent.yaml"))
    assert [r.getMessage() for r in caplog.records if r.name == "mitm_outpost"] == [
        f"configuration error: {tmp_path / 'absent.yaml'}: cannot read configuration file: No such file or directory"]


def test_without_a_file_providers_may_come_from_authentik_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AUTHENTIK_HOST", "http://authentik.invalid/")
    monkeypatch.setenv("AUTHENTIK_TOKEN", "token")
    with outpost(Registry(), tmp_path) as (tctx, _), caplog.at_level(logging.INFO, "mitm_outpost"):
        tctx.options.update(outpost_config=str(tmp_path / "absent.yaml"))
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mitm_outpost"] == [
        (logging.INFO, f"no {tmp_path / 'absent.yaml'}: providers come from authentik only")]


async def test_a_bad_file_while_serving_is_refused_with_a_clear_message_and_the_old_set_keeps_serving(
        tmp_path: Path) -> None:
    registry = Registry()
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test"))
    with outpost(registry, tmp_path) as (tctx, source):
        tctx.options.update(outpost_config=str(path))
        source.running()
        bad = write(tmp_path / "bad.yaml", entry("app", "https://app.example.test", access_token_validity=0))
        with pytest.raises(exceptions.OptionsError) as refused:
            tctx.options.update(outpost_config=str(bad))
        assert str(refused.value) == (f"configuration error: {bad}: provider 'app': field 'access_token_validity': "
                                      "must be a positive number of seconds")
        assert tctx.options.outpost_config == str(path)  # the refused value is rolled back
        assert served(registry) == [("app", "proxy", "https://app.example.test")]
        # mitmproxy's rollback announces the old path again, which is read again in the background
        assert source.reloading is not None
        await source.reloading
    assert served(registry) == [("app", "proxy", "https://app.example.test")]


async def test_a_good_file_while_serving_is_built_in_the_background_and_swapped_in_whole(tmp_path: Path) -> None:
    registry = Registry()
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test"))
    with outpost(registry, tmp_path) as (tctx, source):
        tctx.options.update(outpost_config=str(path))
        source.running()
        before = registry.current
        write(path, entry("app", "https://app.example.test:8443"), entry("new", "https://new.example.test"),
              name="renamed")
        tctx.options.update(outpost_config=str(path))
        assert registry.current is before, "nothing changes until the new set is built"
        assert source.reloading is not None
        await source.reloading
    assert registry.outpost_name == "renamed"
    assert served(registry) == [("app", "proxy", "https://app.example.test:8443"),
                                ("new", "proxy", "https://new.example.test")]
    assert source.reloading is None


async def test_a_reload_that_fails_to_build_keeps_the_old_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test"))
    with outpost(registry, tmp_path) as (tctx, source):
        tctx.options.update(outpost_config=str(path))
        source.running()
        write(path, entry("app", "https://app.example.test", skip_path_regex="^/ok$\n(unclosed\n"))
        with caplog.at_level(logging.ERROR, "mitm_outpost"):
            tctx.options.update(outpost_config=str(path))
            await source.reloading
    messages = [r.getMessage() for r in caplog.records if r.name == "mitm_outpost" and r.levelno >= logging.ERROR]
    assert messages == ["reload refused, the previous configuration keeps serving: configuration error: provider "
                        "'app': field 'skip_path_regex': line 2 '(unclosed': missing ): (unclosed"]
    assert registry.by_name["app"].skip_rules is None


def test_a_redis_session_store_replaces_the_memory_store_with_its_password(tmp_path: Path) -> None:
    registry = Registry()
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test"),
                 session_store="redis://redis.example.test:6380/2", session_store_password="pw")
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(outpost_config=str(path))
    store = registry.store
    assert isinstance(store, RedisStore)
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("redis.example.test", 6380, 2, "pw")


def test_the_same_store_settings_keep_the_store(tmp_path: Path) -> None:
    registry = Registry()
    first = registry.store
    path = write(tmp_path / "outpost.yaml", entry("app", "https://app.example.test"))
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(outpost_config=str(path))
    assert registry.store is first  # sessions survive a reload that keeps `session_store`


def test_trusted_proxies_become_the_registry_s_networks(tmp_path: Path) -> None:
    registry = Registry()
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(trusted_proxies=["10.1.0.0/16", "fd00::1/64"])
        assert registry.trusted_networks == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/64"))
        assert (registry.is_trusted("10.1.2.3"), registry.is_trusted("10.2.0.1"), registry.is_trusted("fd00::7")) == (
            True, False, True)
        with pytest.raises(exceptions.OptionsError, match=r"^trusted_proxies: .*'10\.1\.0\.0/33'"):
            tctx.options.update(trusted_proxies=["10.1.0.0/33"])
        assert tctx.options.trusted_proxies == ["10.1.0.0/16", "fd00::1/64"]


def test_legacy_headers_and_decision_logging_follow_their_options(tmp_path: Path) -> None:
    registry = Registry()
    logger = logging.getLogger("mitm_outpost")
    with outpost(registry, tmp_path) as (tctx, _):
        try:
            tctx.options.update(outpost_legacy_headers=False, outpost_log_decisions=True)
            assert (registry.legacy_headers, logger.level) == (False, logging.DEBUG)
            tctx.options.update(outpost_legacy_headers=True, outpost_log_decisions=False)
            assert (registry.legacy_headers, logger.level) == (True, logging.INFO)
        finally:
            logger.setLevel(logging.INFO)


def test_the_reported_authentik_release_must_be_a_release(tmp_path: Path) -> None:
    registry = Registry()
    with outpost(registry, tmp_path) as (tctx, _):
        tctx.options.update(outpost_authentik_version="2025.10.1-rc2")
        assert registry.authentik_release == "2025.10.1-rc2"
        with pytest.raises(exceptions.OptionsError,
                           match=r"^outpost_authentik_version: an authentik release such as 2025\.10\.0$"):
            tctx.options.update(outpost_authentik_version="latest")
        assert registry.authentik_release == "2025.10.1-rc2"
