"""A mitmproxy script for tests/e2e/test_sign_out_scale.py, loaded after addons/outpost.py.

Once running, it fills the outpost's memory store with OUTPOST_TEST_PREFILL sessions of distinct users
of provider OUTPOST_TEST_PROVIDER, through the store's own `put`, and logs when it is done. Then every
`delete_user` logs what it touched: the entries it deleted and how often anything walked the whole store,
so the test asserts the work structurally, not by the clock.
"""

import asyncio
import logging
import os
import time
from collections.abc import Iterator

from mitmproxy import ctx

from mitm_outpost import sessions

logger = logging.getLogger("mitm_outpost")


class Touched:
    """What the store did while one delete_user ran (the class methods below count only then)."""

    counting = False
    deleted = 0
    walks = 0


_delitem, _iter = sessions._Sessions.__delitem__, sessions._Sessions.__iter__


def _counting_delitem(self: sessions._Sessions, key: str) -> None:
    Touched.deleted += Touched.counting
    _delitem(self, key)


def _counting_iter(self: sessions._Sessions) -> Iterator[str]:
    Touched.walks += Touched.counting
    return _iter(self)


sessions._Sessions.__delitem__ = _counting_delitem  # type: ignore[method-assign]
sessions._Sessions.__iter__ = _counting_iter  # type: ignore[method-assign,assignment]


class StoreSpy:
    def running(self) -> None:
        chain = ctx.master.addons.get("chain")
        registry = next(member.registry for member in chain.members if hasattr(member, "registry"))
        store = registry.store
        assert isinstance(store, sessions.MemoryStore), type(store)
        provider = os.environ["OUTPOST_TEST_PROVIDER"]
        self.filling = asyncio.get_running_loop().create_task(
            self._fill(store, provider, int(os.environ["OUTPOST_TEST_PREFILL"])))
        delete_user = store.delete_user

        async def spied(provider: str, sub: str) -> int:
            users = store._sessions.by_user.get(provider, {})
            before = (store.count(), len(users))
            Touched.counting, Touched.deleted, Touched.walks = True, 0, 0
            started = time.perf_counter()
            try:
                ended = await delete_user(provider, sub)
            finally:
                took, Touched.counting = time.perf_counter() - started, False
            logger.info("store_spy: delete_user ended %d, deleted %d entries, walked the store %d times, %.3f ms; "
                        "sessions %d -> %d, users indexed %d -> %d", ended, Touched.deleted, Touched.walks, took * 1e3,
                        before[0], store.count(), before[1], len(users))
            return ended

        store.delete_user = spied  # type: ignore[method-assign]

    async def _fill(self, store: sessions.MemoryStore, provider: str, count: int) -> None:
        expires_at = time.time() + 3600
        for i in range(count):
            await store.put(sessions.new_id(), sessions.Session.of(provider=provider, sub=f"prefill-{i}",
                                                                   expires_at=expires_at, idp_sid=f"prefill-sid-{i}"))
            if i % 10_000 == 0:
                await asyncio.sleep(0)  # keep serving while filling
        logger.info("store_spy: prefilled %d sessions", store.count())


addons = [StoreSpy()]
