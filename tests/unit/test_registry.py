"""The registry's swaps: a provider set is whole or refused, callbacks run after it, stores hand over."""

import asyncio
import logging
from collections.abc import Iterator

import pytest

from mitm_outpost.config_schema import ConfigError
from mitm_outpost.redis_store import RedisStore
from mitm_outpost.registry import ProviderSet, Registry, parse_networks
from mitm_outpost.sessions import MemoryStore
from tests.support.redis_server import RedisServer
from tests.unit.conftest import make_provider


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_set_with_two_providers_on_one_host_is_refused_and_nothing_changes(registry: Registry) -> None:
    before = registry.current
    clash = make_provider(name="other", client_id="other-client")
    with pytest.raises(ConfigError, match="already serves app.example.test"):
        registry.replace("test-outpost", (*registry.providers, clash))
    assert registry.current is before


def test_callbacks_see_the_whole_new_set_and_one_that_fails_stops_nothing(registry: Registry,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[ProviderSet] = []

    def broken() -> None:
        raise RuntimeError("bug")

    registry.on_change[:] = [broken, lambda: seen.append(registry.current)]
    second = make_provider(name="second", client_id="second-client", external_host="https://second.example.test")
    with caplog.at_level(logging.ERROR, "mitm_outpost"):
        registry.replace("test-outpost", (*registry.providers, second))
    assert seen == [registry.current] and registry.by_name["second"] is second
    assert registry.provider_for("second.example.test", "second.example.test") is second
    assert "broken failed" in caplog.text


async def test_a_new_store_is_started_before_and_the_old_one_stopped_after_the_swap(redis_server: RedisServer) -> None:
    registry = Registry()
    redis_store = RedisStore(redis_server.url)
    registry.install(ProviderSet(), redis_store)
    assert registry.store is redis_store
    assert sorted(t.get_coro().__qualname__ for t in redis_store._tasks) == [  # invalidation channel and health watch
        "RedisStore._follow_invalidations", "RedisStore._watch"]
    tasks = list(redis_store._tasks)
    memory = MemoryStore()
    registry.install(ProviderSet(), memory)
    await asyncio.sleep(0.1)
    assert registry.store is memory and all(task.done() for task in tasks)


def test_trust_is_judged_again_when_the_networks_change() -> None:
    registry = Registry()
    assert not registry.is_trusted("10.0.0.7")
    registry.trusted_networks = parse_networks(["10.0.0.0/8", "::1/128"])
    assert registry.is_trusted("10.0.0.7") and registry.is_trusted("10.0.0.7")  # the second from the memo
    assert registry.is_trusted("::ffff:10.0.0.7") and registry.is_trusted("::1")
    assert not registry.is_trusted("192.0.2.1") and not registry.is_trusted("not an address")
    registry.trusted_networks = parse_networks(["192.0.2.0/24"])
    assert not registry.is_trusted("10.0.0.7") and registry.is_trusted("192.0.2.1")
