"""MemoryStore's indexes (by provider and user, by IdP session) stay exactly what the store holds,
whichever way a session leaves: sign-out reads them instead of walking every session."""

import asyncio
import time

from cachetools import Cache

from mitm_outpost.sessions import MemoryStore, Session, storage_key


def session(sub: str = "alice", ttl: float = 60, sid: str = "", provider: str = "p") -> Session:
    return Session.of(provider=provider, sub=sub, expires_at=time.time() + ttl, idp_sid=sid)


def as_set(keys: str | set[str]) -> set[str]:
    return {keys} if isinstance(keys, str) else set(keys)


def indexes(store: MemoryStore) -> tuple[dict[tuple[str, str], set[str]], dict[str, set[str]]]:
    """The two indexes as plain sets of storage keys."""
    by_user = {(p, sub): as_set(k) for p, users in store._sessions.by_user.items() for sub, k in users.items()}
    return by_user, {sid: as_set(k) for sid, k in store._sessions.by_sid.items()}


def expected(store: MemoryStore) -> tuple[dict[tuple[str, str], set[str]], dict[str, set[str]]]:
    """The indexes rebuilt from every entry the cache holds, expired but not yet purged ones included."""
    by_user: dict[tuple[str, str], set[str]] = {}
    by_sid: dict[str, set[str]] = {}
    for key in Cache.__iter__(store._sessions):
        held = Cache.__getitem__(store._sessions, key)
        by_user.setdefault((held.provider, held.sub), set()).add(key)
        if held.idp_sid:
            by_sid.setdefault(held.idp_sid, set()).add(key)
    return by_user, by_sid


def consistent(store: MemoryStore) -> bool:
    return indexes(store) == expected(store)


async def test_put_and_delete_keep_the_indexes() -> None:
    store = MemoryStore()
    await store.put("a1", session(sid="s1"))
    await store.put("a2", session(sid="s2"))
    await store.put("b1", session(sub="bob", sid="s1"))
    await store.put("o1", session(provider="other"))
    assert consistent(store)
    assert indexes(store)[0][("p", "alice")] == {storage_key("a1"), storage_key("a2")}
    await store.delete("p", "a1")
    await store.delete("p", "o1")  # another provider's session: kept
    assert consistent(store) and store._sessions.by_user["p"]["alice"] == storage_key("a2")  # one key: no set
    await store.delete("other", "o1")
    assert consistent(store) and "other" not in store._sessions.by_user


async def test_a_replaced_session_leaves_its_old_user() -> None:
    store = MemoryStore()
    await store.put("c", session(sub="alice", sid="s1"))
    await store.put("c", session(sub="bob"))
    assert consistent(store) and indexes(store) == ({("p", "bob"): {storage_key("c")}}, {})
    await store.put("c", session(sub="bob", ttl=-1))  # replaced by an expired one: gone
    assert consistent(store) and indexes(store) == ({}, {}) and store.count() == 0


async def test_expired_sessions_leave_the_indexes() -> None:
    store = MemoryStore()
    for i in range(1000):
        await store.put(f"short-{i}", session(sub=f"user-{i}", ttl=0.05, sid=f"sid-{i}"))
    await store.put("long", session(sub="user-0", sid="sid-0"))
    assert len(indexes(store)[0]) == 1000 and consistent(store)
    await asyncio.sleep(0.1)
    await store.put("new", session(sub="new"))  # every put purges what has expired
    assert consistent(store)
    assert indexes(store) == ({("p", "user-0"): {storage_key("long")}, ("p", "new"): {storage_key("new")}},
                              {"sid-0": {storage_key("long")}})


async def test_evicted_sessions_leave_the_indexes() -> None:
    store = MemoryStore(max_sessions=3)
    for i in range(5):
        await store.put(str(i), session(sub=f"user-{i}", sid=f"sid-{i}"))
    assert consistent(store) and set(indexes(store)[1]) == {"sid-2", "sid-3", "sid-4"}


async def test_delete_user_and_idp_session_end_only_theirs_and_count_the_live_ones() -> None:
    store = MemoryStore()
    await store.put("gone", session(ttl=0.05, sid="s1"))
    await store.put("a1", session(sid="s1"))
    await store.put("a2", session(sid="s2"))
    await store.put("b1", session(sub="bob", sid="s2"))
    await store.put("o1", session(provider="other"))
    await asyncio.sleep(0.1)  # "gone" has expired; nothing has purged it yet
    assert await store.delete_user("p", "alice") == 2
    assert consistent(store) and store.count() == 2
    assert await store.delete_user("p", "alice") == 0
    assert await store.delete_idp_session("s2") == 1 and await store.get("p", "b1") is None
    assert await store.delete_idp_session("") == 0 and await store.delete_user("p", "nobody") == 0
    assert consistent(store) and indexes(store) == ({("other", "alice"): {storage_key("o1")}}, {})


async def test_clear_empties_the_indexes() -> None:
    store = MemoryStore()
    await store.put("a", session(sid="s1"))
    store._sessions.clear()
    assert indexes(store) == ({}, {}) and consistent(store)
