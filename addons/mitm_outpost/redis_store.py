"""Sessions shared by replicas, in Redis or Valkey (the `redis` package's asyncio client).

Keys are namespaced per provider and expire in Redis by themselves. Two indexes, by user
(`sub`) and by IdP session (`sid`), make "end every session of this user" one round trip
(a Lua script), not a scan. Each replica keeps a short local cache so the hot path does not
touch Redis; every deletion is published, and every replica drops the entry from its cache
within a second. Logins in progress are shared too, so a callback may land on any replica.
Every Redis failure becomes StoreUnavailable: the chain answers 503, never lets a request pass.
Replicas of different releases share the store, so a stored session carries its format version and
names headers through that version's frozen table: what a replica cannot read counts as signed out.
"""

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import redis.asyncio as redis
from cachetools import TTLCache
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import names
from .edge_rules import TOKEN
from .sessions import (
    LOGIN_TTL,
    NOT_CACHED,
    LoginRefused,
    NotCached,
    PendingLogin,
    Session,
    StoreUnavailable,
    header_value,
    shared,
    storage_key,
)

logger = logging.getLogger("mitm_outpost")

PREFIX = "mo:"
CHANNEL = PREFIX + "invalidate"
TIMEOUT = 1.0  # seconds; a slow Redis is a down Redis for a proxy
LOCAL_TTL = 300.0  # safe to be long: every deletion is published, and a lost channel or a failed
# call empties the cache, so a session is never served from it while Redis cannot be asked

# Delete every session named in an index, and the index: one round trip. An index is a hash whose
# fields are session keys: small hashes are listpacks, a few hundred bytes less than a set.
_DELETE_INDEXED = """
local members = redis.call('HKEYS', KEYS[1])
for _, key in ipairs(members) do redis.call('DEL', key) end
redis.call('DEL', KEYS[1])
return members
"""

# Take a pending login only for its provider and the browser it is bound to, in one atomic step: a
# callback replayed without the right pre-login cookie leaves it in place. false: none (or unreadable,
# as another version's format would be); 0: another browser's. The binding is a SHA-256 of the cookie,
# so comparing it in plain Lua (not in constant time) gives away nothing a cookie could be made from.
_TAKE_LOGIN = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local ok, login = pcall(cjson.decode, raw)
if not ok or type(login) ~= 'table' or login.provider ~= ARGV[1] then return false end
if login.browser_binding ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return raw
"""


def session_key(provider: str, key: str) -> str:
    """128 bits of the cookie value's SHA-256 name the key: unguessable, and short in the indexes."""
    return f"{PREFIX}{provider}:s:{key[:32]}"


# The stored format, versioned: each session carries its version ("f"), and a known header name travels as its
# index in that version's table. So a table is frozen: written out, never derived from names.py (whose tuples may be
# reordered), never edited once released. Indexing another name or changing the fields is a new version with a
# table of its own; the old versions stay readable. A name its table lacks travels as itself.
# Version 1 is also every session stored without "f": releases before the tag wrote none, and they read every
# session with table 1, so no other table may be written while such a release still runs.
FORMAT_VERSION = 1
NAME_TABLES: dict[int, tuple[str, ...]] = {
    1: ("X-authentik-username", "X-authentik-groups", "X-authentik-entitlements", "X-authentik-email",
        "X-authentik-name", "X-authentik-uid", "X-authentik-jwt", "X-authentik-meta-jwks", "X-authentik-meta-outpost",
        "X-authentik-meta-provider", "X-authentik-meta-app", "X-authentik-meta-version",
        "X-Auth-Username", "X-Auth-Groups", "X-Forwarded-Email", "X-Forwarded-Preferred-Username", "X-Forwarded-User"),
}
FIELDS = frozenset({"f", "p", "h", "v", "e", "s", "i", "t", "b", "be", "r"})  # a field beyond these: a newer format
_TABLES = {version: tuple(shared(name.encode()) for name in table) for version, table in NAME_TABLES.items()}
NAME_INDEX = {name: i for i, name in enumerate(_TABLES[FORMAT_VERSION])}
DEFAULT_REPLACES = frozenset({b"host"})
UID = names.UID.encode()  # the session's `sub`, which encode() then leaves out


class Unreadable(ValueError):
    """A stored session of an unknown version, or damaged: it counts as signed out. The message says what is
    wrong and quotes nothing of the value, so it may be logged."""


def encode(session: Session) -> str:
    """Only what the headers and sign-out need, compactly (a session stays under 2 KiB in Redis)."""
    layout = [[NAME_INDEX.get(name, name.decode("latin-1")), i] for name, i in session.layout]
    doc: dict[str, Any] = {"f": FORMAT_VERSION, "p": session.provider, "h": layout,
                           "v": session.values.decode("latin-1"), "e": session.expires_at}
    optional = {"s": session.sub if session.header(UID) != session.sub else None, "i": session.idp_sid,
                "t": session.id_token, "b": session.backend, "be": session.backend_error,
                "r": [r.decode("latin-1") for r in session.replaces] if session.replaces != DEFAULT_REPLACES else None}
    doc.update({k: v for k, v in optional.items() if v})
    return json.dumps(doc, separators=(",", ":"))


def decode(raw: bytes | str) -> Session:
    """The stored session, or Unreadable: every field is checked, so that what another version or damage left
    can never become a session with a wrong header (or one that fails later, on a request)."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise Unreadable("not JSON") from None
    if not isinstance(d, dict):
        raise Unreadable("not a JSON object")
    version = d.get("f", 1)
    if type(version) is not int:
        raise Unreadable("a format version that is not an integer")
    if version not in _TABLES:
        raise Unreadable(f"unknown format version {str(version)[:12]}")
    if not d.keys() <= FIELDS:
        raise Unreadable(f"fields that format {version} does not have")
    try:
        return _session(d, _TABLES[version])
    except (KeyError, TypeError, ValueError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None  # ours or Python's: a field's name, never its value


def _session(d: dict[str, Any], table: tuple[bytes, ...]) -> Session:
    values = _bytes(d["v"])
    count = values.count(b"\n") + 1
    layout = shared(tuple((_name(name, table), _index(i, count)) for name, i in map(_pair, _list(d["h"]))))
    if type(d["e"]) not in (int, float):
        raise TypeError("an expiry that is not a number")
    backend = None
    if d.get("b"):
        scheme, host, port, host_header = _list(d["b"])
        backend = (_text(scheme), _text(host), _index(port, 65536), _text(host_header))
    replaces = shared(frozenset(_bytes(r) for r in _list(d["r"]))) if d.get("r") else DEFAULT_REPLACES
    return Session(
        provider=_text(d["p"]), sub=_text(d.get("s", "")) or header_value(layout, values, UID) or "", layout=layout,
        values=values, expires_at=d["e"], idp_sid=_text(d.get("i", "")), id_token=_text(d.get("t", "")),
        backend=backend, backend_error=_text(d.get("be", "")), replaces=replaces,
    )


def _name(name: Any, table: tuple[bytes, ...]) -> bytes:
    """A header name: its index in the table, or itself."""
    if isinstance(name, str):
        if not TOKEN.fullmatch(name.encode("latin-1")):
            raise ValueError("a header name that is not a token")
        return shared(name.encode())
    return table[_index(name, len(table))]


def _index(value: Any, size: int) -> int:
    """A JSON integer from 0 to size - 1 (an index, a port): never a boolean, never negative (an index Python
    would count from the end)."""
    if type(value) is not int or not 0 <= value < size:
        raise ValueError("an index out of range")
    return value


def _pair(value: Any) -> list[Any]:
    pair = _list(value)
    if len(pair) != 2:
        raise ValueError("a header that is not a [name, value] pair")
    return pair


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("a list expected")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text expected")
    return value


def _bytes(value: Any) -> bytes:
    """Bytes as encode() stores them: text of one latin-1 character per byte."""
    try:
        return _text(value).encode("latin-1")
    except UnicodeEncodeError:  # its message would quote the value
        raise ValueError("text beyond latin-1") from None


class RedisStore:
    def __init__(self, url: str, password: str | None = None) -> None:
        # One retry on a fresh connection: after a Redis restart the pooled ones are dead, and the first
        # command on each would otherwise fail a request that a new connection serves at once.
        self.client = redis.Redis.from_url(url, password=password, socket_timeout=TIMEOUT,
                                           socket_connect_timeout=TIMEOUT, health_check_interval=10,
                                           retry=Retry(NoBackoff(), 1),
                                           retry_on_error=[redis.ConnectionError])
        self.local: TTLCache[str, Session] = TTLCache(maxsize=100_000, ttl=LOCAL_TTL)
        self._delete_indexed = self.client.register_script(_DELETE_INDEXED)
        self._take_login = self.client.register_script(_TAKE_LOGIN)
        self._tasks: list[asyncio.Task[None]] = []
        self.up = True  # readiness: false from a failed call until the next successful one

    async def _call(self, coroutine: Any) -> Any:
        try:
            result = await coroutine
        except (redis.RedisError, OSError, asyncio.TimeoutError) as e:
            if self.up:
                logger.error("redis: session store unavailable (%s); protected requests get 503", e)
            self.up = False
            self.local.clear()
            raise StoreUnavailable(f"redis: {e}") from None
        if not self.up:
            logger.info("redis: session store is back")
            self.up = True
        return result

    def start(self) -> None:
        """Follow the invalidation channel and watch health (called once the event loop runs)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._follow_invalidations()), asyncio.create_task(self._watch())]

    def stop(self) -> None:
        """Replaced by another store (a reload): its tasks end and its connections close."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.local.clear()
        asyncio.get_running_loop().create_task(self.client.aclose())

    async def _watch(self) -> None:
        while True:
            try:
                await self._call(self.client.ping())
            except StoreUnavailable:
                pass
            await asyncio.sleep(1)

    async def _follow_invalidations(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(CHANNEL)
                self.local.clear()  # anything may have changed while we were not listening
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        for key in message["data"].decode().split(","):
                            self.local.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.local.clear()
                logger.warning("redis: invalidation channel lost (%s); retrying", e)
                await asyncio.sleep(1)

    def cached(self, provider: str, session_id: str) -> Session | None | NotCached:
        session = self.local.get(session_key(provider, storage_key(session_id)))
        if session is None:
            return NOT_CACHED
        return session if session.expires_at > time.time() else None

    async def get(self, provider: str, session_id: str) -> Session | None:
        if not isinstance(found := self.cached(provider, session_id), NotCached):
            return found
        key = session_key(provider, storage_key(session_id))
        raw = await self._call(self.client.get(key))
        if raw is None:
            return None
        try:
            session = decode(raw)
        except Unreadable as e:
            logger.warning("redis: session %s… is unreadable (%s); it counts as signed out", key[:24], e)
            return None
        self.local[key] = session
        return session

    async def put(self, session_id: str, session: Session) -> None:
        key = session_key(session.provider, storage_key(session_id))
        expire_at = int(session.expires_at) + 1
        user_index = f"{PREFIX}{session.provider}:u:{session.sub}"
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, encode(session), exat=expire_at)
            pipe.hset(user_index, key, "")
            pipe.expireat(user_index, expire_at, gt=True)
            pipe.expireat(user_index, expire_at, nx=True)
            if session.idp_sid:
                sid_index = f"{PREFIX}sid:{session.idp_sid}"
                pipe.hset(sid_index, key, "")
                pipe.expireat(sid_index, expire_at, gt=True)
                pipe.expireat(sid_index, expire_at, nx=True)
            await self._call(pipe.execute())

    async def _forget(self, keys: list[str]) -> None:
        for key in keys:
            self.local.pop(key, None)
        if keys:
            await self._call(self.client.publish(CHANNEL, ",".join(keys)))

    async def delete(self, provider: str, session_id: str) -> None:
        key = session_key(provider, storage_key(session_id))
        await self._call(self.client.delete(key))
        await self._forget([key])

    async def delete_user(self, provider: str, sub: str) -> int:
        members = await self._call(self._delete_indexed(keys=[f"{PREFIX}{provider}:u:{sub}"]))
        await self._forget([m.decode() for m in members])
        return len(members)

    async def delete_idp_session(self, idp_sid: str) -> int:
        if not idp_sid:
            return 0
        members = await self._call(self._delete_indexed(keys=[f"{PREFIX}sid:{idp_sid}"]))
        await self._forget([m.decode() for m in members])
        return len(members)

    async def put_login(self, state: str, login: PendingLogin) -> None:
        value = json.dumps(dataclasses.asdict(login))
        await self._call(self.client.set(f"{PREFIX}login:{storage_key(state)}", value, ex=LOGIN_TTL))

    async def take_login(self, state: str, provider: str, browser_binding: str) -> PendingLogin | LoginRefused:
        key = f"{PREFIX}login:{storage_key(state)}"
        raw = await self._call(self._take_login(keys=[key], args=[provider, browser_binding]))
        if raw is None:
            return LoginRefused.UNKNOWN
        if raw == 0:
            return LoginRefused.OTHER_BROWSER
        return PendingLogin(**json.loads(raw))

    def count(self) -> int:
        return len(self.local)

    def snapshot(self) -> list[Session]:
        return [s for s in self.local.values() if s.expires_at > time.time()]

