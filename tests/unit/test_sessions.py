import time

import pytest

from mitm_outpost.sessions import LoginRefused, MemoryStore, PendingLogin, Session, storage_key


def session(provider: str = "p", sub: str = "u", ttl: float = 60, sid: str = "") -> Session:
    return Session.of(provider=provider, sub=sub, expires_at=time.time() + ttl, idp_sid=sid)


async def test_sessions_expire_on_their_own() -> None:
    store = MemoryStore()
    await store.put("a", session(ttl=-1))
    await store.put("b", session())
    assert await store.get("p", "a") is None and await store.get("p", "b") is not None
    assert await store.get("other-provider", "b") is None
    assert store.count() == 1


async def test_store_keys_are_hashes_not_cookie_values() -> None:
    store = MemoryStore()
    await store.put("cookie-value", session())
    assert "cookie-value" not in store._sessions and storage_key("cookie-value") in store._sessions


async def test_delete_user_and_idp_session() -> None:
    store = MemoryStore()
    await store.put("1", session(sub="alice", sid="s1"))
    await store.put("2", session(sub="alice", sid="s2"))
    await store.put("3", session(provider="other", sub="alice"))
    await store.put("4", session(sub="bob", sid="s1"))
    assert await store.delete_user("p", "alice") == 2
    assert await store.get("other", "3") is not None
    assert await store.delete_idp_session("s1") == 1 and await store.get("p", "4") is None
    assert await store.delete_idp_session("") == 0


async def test_pending_logins_are_used_once() -> None:
    store = MemoryStore()
    login = PendingLogin("p", "binding", "nonce", "verifier", "https://a/", "https://a/outpost.goauthentik.io/callback")
    await store.put_login("state", login)
    assert await store.take_login("state", "p", "binding") == login
    assert await store.take_login("state", "p", "binding") is LoginRefused.UNKNOWN


def test_redis_encoding_round_trips_and_stays_small() -> None:
    from mitm_outpost.identity import user_headers
    from mitm_outpost.redis_store import decode, encode

    claims = {"sub": "u-1", "preferred_username": "alice", "email": "alice@example.test", "name": "Alice",
              "groups": ["a", "b"]}
    headers = user_headers(claims, "eyJ" + "x" * 900, True) + ((b"X-Team", b"blue"),)
    session = Session.of(provider="p", sub="u-1", headers=headers, expires_at=time.time() + 60, idp_sid="sid",
                         id_token="other", backend=("http", "b.test", 80, "b.test"),
                         replaces=frozenset({b"host", b"x-team"}))
    raw = encode(session)
    assert decode(raw) == session
    assert len(raw) < 1400


def test_headers_are_packed_and_unpacked_as_given() -> None:
    from mitm_outpost.identity import user_headers

    jwt = "eyJ" + "x" * 900
    made = [Session.of(provider="p", sub=f"u-{i}", headers=user_headers({"sub": f"u-{i}", "preferred_username": name,
                                                                         "groups": ["a", "b"]}, jwt, True),
                       expires_at=0)
            for i, name in enumerate(("alice", "bob"))]
    alice, bob = made
    assert alice.headers == user_headers({"sub": "u-0", "preferred_username": "alice", "groups": ["a", "b"]}, jwt, True)
    assert alice.layout is bob.layout  # one layout for every session with the same header names
    assert alice.values.count(b"alice") == 1  # X-authentik-username and its legacy copies share one value
    assert (alice.username, bob.username, alice.id_token_hint) == ("alice", "bob", jwt)
    assert Session.of(provider="p", sub="u-9", expires_at=0).username == "u-9"
    with pytest.raises(ValueError, match="line break"):
        Session.of(provider="p", sub="u", headers=((b"X-Evil", b"a\nb"),), expires_at=0)
