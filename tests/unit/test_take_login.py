"""take_login checks the browser binding before it uses a pending login up, in both stores: a callback
replayed without the right pre-login cookie must leave the login for the browser that started it."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from mitm_outpost.redis_store import PREFIX, RedisStore
from mitm_outpost.sessions import LoginRefused, MemoryStore, PendingLogin, SessionStore, storage_key
from tests.support.redis_server import RedisServer

LOGIN = PendingLogin("p", "binding-of-the-real-browser", "nonce", "verifier", "https://a/", "https://a/callback")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.client().flushdb()
    redis_store = RedisStore(server.url)
    yield redis_store
    await redis_store.client.aclose()


async def test_another_browser_does_not_use_the_login_up(store: SessionStore) -> None:
    await store.put_login("state", LOGIN)
    assert await store.take_login("state", "p", "binding-of-another-browser") is LoginRefused.OTHER_BROWSER
    assert await store.take_login("state", "p", "") is LoginRefused.OTHER_BROWSER
    assert await store.take_login("state", "p", LOGIN.browser_binding) == LOGIN
    assert await store.take_login("state", "p", LOGIN.browser_binding) is LoginRefused.UNKNOWN  # used once


async def test_another_providers_callback_does_not_use_the_login_up(store: SessionStore) -> None:
    await store.put_login("state", LOGIN)
    assert await store.take_login("state", "other", LOGIN.browser_binding) is LoginRefused.UNKNOWN
    assert await store.take_login("state", "p", LOGIN.browser_binding) == LOGIN


async def test_unknown_state(store: SessionStore) -> None:
    assert await store.take_login("never-made", "p", LOGIN.browser_binding) is LoginRefused.UNKNOWN


async def test_concurrent_callbacks_use_a_login_once(store: SessionStore) -> None:
    await store.put_login("state", LOGIN)
    taken = await asyncio.gather(*(store.take_login("state", "p", LOGIN.browser_binding) for _ in range(20)))
    assert taken.count(LOGIN) == 1 and taken.count(LoginRefused.UNKNOWN) == 19


async def test_an_unreadable_login_in_redis_counts_as_none(redis_server: RedisServer) -> None:
    """Another version's format (or damage) refuses that login; Redis itself is not taken for down."""
    redis_server.client().set(f"{PREFIX}login:{storage_key('state')}", "not json", ex=60)
    store = RedisStore(redis_server.url)
    try:
        assert await store.take_login("state", "p", LOGIN.browser_binding) is LoginRefused.UNKNOWN
        assert store.up
    finally:
        await store.client.aclose()
