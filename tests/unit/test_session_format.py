"""The Redis session format: replicas of different releases share one store, so a stored session carries its
format version and names its headers through that version's frozen table. A replica reads every known version
as it was written, and what it cannot read counts as signed out: never an exception, never a wrong header."""

import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from mitm_outpost import names
from mitm_outpost.redis_store import FORMAT_VERSION, NAME_TABLES, RedisStore, Unreadable, decode, encode, session_key
from mitm_outpost.sessions import NOT_CACHED, Session, storage_key

# Written by redis_store.encode before the format had a version (commit 2675736), from a login with
# authentik-like claims, legacy headers on and one additional header. Never regenerate it.
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "redis-session-untagged.json").read_text())
STORED: str = FIXTURE["stored"]

# sha256 of each released table (json.dumps of the tuple): a table is never edited, a new version adds a pin.
PINNED_TABLES = {1: "7d76e0e1e1b97d29aff440ed9f3e60c56600d150e2ae0060417c6dfa5425297d"}


def expected() -> Session:
    """The session FIXTURE was stored from, as the release that stored it held it."""
    s = FIXTURE["session"]
    headers = tuple((name.encode(), value.encode()) for name, value in s["headers"])
    backend = tuple(s["backend"]) if s["backend"] else None
    return Session.of(provider=s["provider"], sub=s["sub"], headers=headers, expires_at=s["expires_at"],
                      idp_sid=s["idp_sid"], id_token=s["id_token"], backend=backend, backend_error=s["backend_error"],
                      replaces=frozenset(r.encode() for r in s["replaces"]))


def stored_with(**fields: Any) -> str:
    """Today's encoding of the fixture's session with some fields replaced (None: removed)."""
    doc = json.loads(encode(expected())) | fields
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def test_a_session_stored_before_the_version_tag_reads_as_it_was_written() -> None:
    assert "f" not in json.loads(STORED)
    session = decode(STORED)
    assert session == expected()
    assert session.headers[:2] == ((names.USERNAME.encode(), b"zmuller"), (names.GROUPS.encode(),
                                                                           b"authentik Admins|grafana-editors|on-call"))
    assert session.header(b"X-Forwarded-User") == session.sub and session.username == "zmuller"


def test_a_session_round_trips_with_its_version() -> None:
    session = expected()
    raw = encode(session)
    assert json.loads(raw)["f"] == FORMAT_VERSION
    assert decode(raw) == session and decode(raw.encode()) == session


def test_a_header_name_outside_the_table_round_trips_with_every_token_character() -> None:
    """An additional header travels as its name: any RFC 9110 token, `_` and the other symbols included."""
    session = expected()
    name = b"X_Team!#$%&'*+-.^_`|~9"
    custom = Session.of(provider=session.provider, sub=session.sub, headers=((*session.headers, (name, b"v"))),
                        expires_at=session.expires_at)
    assert decode(encode(custom)).header(name) == "v"


def test_the_name_tables_are_frozen() -> None:
    digests = {v: hashlib.sha256(json.dumps(table).encode()).hexdigest() for v, table in NAME_TABLES.items()}
    assert digests == PINNED_TABLES, "a released table is never edited: add a new version (and pin it here)"
    assert FORMAT_VERSION == max(NAME_TABLES)


def test_reordering_the_names_cannot_change_what_a_stored_session_reads_as(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of redis_store built while names.py's tuples are in another order reads and writes the same."""
    for group in ("USER_HEADERS", "META_HEADERS", "IDENTITY_HEADERS", "ALL_IDENTITY_HEADERS"):
        monkeypatch.setattr(names, group, getattr(names, group)[::-1])
    monkeypatch.setattr(names, "LEGACY_HEADERS", dict(reversed(names.LEGACY_HEADERS.items())))
    spec = importlib.util.find_spec("mitm_outpost.redis_store")
    assert spec is not None and spec.loader is not None
    reordered = importlib.util.module_from_spec(spec)  # not in sys.modules: the real module stays as it is
    spec.loader.exec_module(reordered)
    assert reordered.decode(STORED) == expected()
    assert reordered.encode(expected()) == encode(expected())


@pytest.mark.parametrize("version", [2, 0, -1, 99, "1", 1.0, True, None, [1]])
def test_an_unknown_version_is_signed_out(version: Any) -> None:
    doc = json.loads(encode(expected())) | {"f": version}
    with pytest.raises(Unreadable, match="format version"):
        decode(json.dumps(doc))


@pytest.mark.parametrize("raw", [
    "", "{", "not json", "[]", "null", "1", "[" * 100_000,
    stored_with(h=[[len(NAME_TABLES[1]), 0]]),  # beyond the table
    stored_with(h=[[-1, 0]]),  # Python would take the table's last name
    stored_with(h=[[True, 0]]), stored_with(h=[[0.0, 0]]), stored_with(h=[[0, 99]]), stored_with(h=[[0, -1]]),
    stored_with(h=[[0]]), stored_with(h=[[0, 0, 0]]), stored_with(h={"0": 0}), stored_with(h=["ab"]),
    stored_with(h=[["X-Evil\r\nX-authentik-username", 0]]), stored_with(h=[["", 0]]),
    stored_with(v=None), stored_with(p=None), stored_with(e=None), stored_with(h=None),
    stored_with(v=5), stored_with(v="\u20ac"), stored_with(p=["grafana"]),
    stored_with(e="tomorrow"), stored_with(e=True),
    stored_with(b=["http", "b.test", "80", "b.test"]), stored_with(b=["http", "b.test", 80]), stored_with(b="http"),
    stored_with(r="host"), stored_with(r=[1]), stored_with(s=7), stored_with(t=["x"]),
    stored_with(z="a field no version has"),
])
def test_a_damaged_value_is_signed_out(raw: str) -> None:
    with pytest.raises(Unreadable):
        decode(raw)


def test_no_damage_raises_anything_but_unreadable() -> None:
    """Every truncation, and random characters anywhere: a readable session or Unreadable, nothing else."""
    rng = random.Random(0)
    damaged = [STORED[:n] for n in range(len(STORED))]
    for _ in range(2000):
        at = rng.randrange(len(STORED))
        damaged.append(STORED[:at] + rng.choice('0123456789-.[]{}",:etfnul\\ ') + STORED[at + rng.randrange(2):])
    for raw in damaged:
        try:
            session = decode(raw)
        except Unreadable:
            continue
        assert isinstance(session.headers, tuple) and isinstance(session.username, str)


async def test_the_store_counts_what_it_cannot_read_as_signed_out(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore("redis://127.0.0.1:1/0")  # never connected: Redis's GET is replaced below
    held: dict[str, bytes] = {}

    async def get(key: str) -> bytes | None:
        return held.get(key)

    monkeypatch.setattr(store.client, "get", get)
    key = session_key("grafana", storage_key("the-cookie-value"))
    with caplog.at_level(logging.WARNING, "mitm_outpost"):
        for raw in (stored_with(f=99), STORED[:-1], stored_with(h=[[0, 99]])):
            held[key] = raw.encode()
            assert await store.get("grafana", "the-cookie-value") is None
    assert caplog.text.count("it counts as signed out") == 3 and "unknown format version 99" in caplog.text
    session = expected()
    secrets = (session.id_token, session.header(names.JWT.encode()), session.sub, "zmuller", "the-cookie-value")
    assert not any(secret and secret in caplog.text for secret in secrets)
    assert store.cached("grafana", "the-cookie-value") is NOT_CACHED  # unreadable values are never cached
    held[key] = STORED.encode()
    assert await store.get("grafana", "the-cookie-value") == session
    assert store.cached("grafana", "the-cookie-value") == session  # from the local cache, no GET
    del held[key]
    assert await store.get("grafana", "the-cookie-value") == session
    assert store.cached("other-provider", "the-cookie-value") is NOT_CACHED
    store.local[key] = Session.of(provider="grafana", sub="gone", expires_at=1.0)
    assert store.cached("grafana", "the-cookie-value") is None  # expired
    assert await store.get("grafana", "the-cookie-value") is None
    await store.client.aclose()
