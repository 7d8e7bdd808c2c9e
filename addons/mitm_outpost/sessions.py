"""Server-side sessions and logins in progress, behind one small interface.

The browser holds only an opaque random id; the store keys everything by a hash of it, so
a dump of the store yields no usable cookie. The interface is async so that a networked
store (Redis) drops in without any addon changing.
"""

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import Cache, TLRUCache, TTLCache

from . import names

LOGIN_TTL = 600  # seconds a login may take from /start to /callback


def new_id() -> str:
    return secrets.token_urlsafe(32)


def storage_key(opaque_id: str) -> str:
    return hashlib.sha256(opaque_id.encode()).hexdigest()


HeaderFields = tuple[tuple[bytes, bytes], ...]
Layout = tuple[tuple[bytes, int], ...]  # each header's name and which of the values it carries

_SHARED: dict[Any, Any] = {}


def shared(value: Any) -> Any:
    """One copy of values most sessions have in common (header names, layouts, `replaces`)."""
    return _SHARED.setdefault(value, value) if len(_SHARED) < 10_000 else value


def pack(headers: HeaderFields) -> tuple[Layout, bytes]:
    """Headers as a layout (shared by every session with the same names) and their distinct values
    in one bytes object: a tuple of pairs costs over a KiB more per session (BENCHMARKS.md)."""
    index: dict[bytes, int] = {}
    layout = []
    for name, value in headers:
        if b"\n" in value:
            raise ValueError(f"header {name!r}: a value with a line break")
        layout.append((shared(name), index.setdefault(value, len(index))))
    return shared(tuple(layout)), b"\n".join(index)


def header_value(layout: Layout, values: bytes, name: bytes) -> str | None:
    for key, i in layout:
        if key == name:
            return values.split(b"\n")[i].decode("utf-8", "surrogateescape")
    return None


@dataclass(frozen=True, slots=True)
class Session:
    """What a login leaves behind: who the user is, the headers they get, when it ends.

    Build one with `Session.of(headers=...)`; `headers` unpacks them (about 2 µs, once per request)."""

    provider: str
    sub: str
    layout: Layout
    values: bytes  # the distinct header values, newline-separated (identity values never hold one)
    expires_at: float
    idp_sid: str = ""
    id_token: str = ""  # only when it is not already the X-authentik-jwt value (see id_token_hint)
    # ak_proxy: (scheme, host, port, Host header) for this user; scheme "" = the provider's upstream
    # with only the Host header changed. `backend_error` says why the claims cannot be honoured.
    backend: tuple[str, str, int, str] | None = None
    backend_error: str = ""
    replaces: frozenset[bytes] = frozenset({b"host"})  # lower-case names of client headers ours replace

    @classmethod
    def of(cls, *, headers: HeaderFields = (), **fields: Any) -> "Session":
        layout, values = pack(headers)
        return cls(layout=layout, values=values, **fields)

    @property
    def headers(self) -> HeaderFields:
        values = self.values.split(b"\n")
        return tuple([(name, values[i]) for name, i in self.layout])

    def header(self, name: bytes) -> str | None:
        return header_value(self.layout, self.values, name)

    @property
    def username(self) -> str:
        return self.header(_USERNAME) or self.sub

    @property
    def id_token_hint(self) -> str:
        """The ID token for the IdP's end-session endpoint, kept once per session."""
        return self.id_token or self.header(_JWT) or ""


_USERNAME = names.USERNAME.encode()
_JWT = names.JWT.encode()


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """A login between /start and /callback. Used once, then deleted."""

    provider: str
    browser_binding: str  # sha256 of the pre-login cookie value
    nonce: str
    code_verifier: str
    redirect: str
    redirect_uri: str  # the callback URL the IdP was given (the token request repeats it)


class LoginRefused(enum.Enum):
    """Why `take_login` consumed nothing: the pending login, if there is one, stays for its own browser."""

    UNKNOWN = "unknown"  # none under this state for this provider: used already, expired, or never made
    OTHER_BROWSER = "other_browser"  # bound to another browser's pre-login cookie


class StoreUnavailable(Exception):
    """The store cannot answer (Redis down or slow): requests fail closed with 503."""


class NotCached:
    """What `SessionStore.cached` answers when only `get` (with I/O) can tell."""


NOT_CACHED = NotCached()


class SessionStore(Protocol):
    async def get(self, provider: str, session_id: str) -> Session | None: ...
    def cached(self, provider: str, session_id: str) -> Session | None | NotCached:
        """`get`'s answer when it needs no I/O (a memory store; Redis' local cache), else NOT_CACHED: most
        requests then need no coroutine of their own."""
        ...
    async def put(self, session_id: str, session: Session) -> None: ...
    async def delete(self, provider: str, session_id: str) -> None: ...
    async def delete_user(self, provider: str, sub: str) -> int: ...
    async def delete_idp_session(self, idp_sid: str) -> int: ...
    async def put_login(self, state: str, login: PendingLogin) -> None: ...
    async def take_login(self, state: str, provider: str, browser_binding: str) -> PendingLogin | LoginRefused:
        """The pending login, deleted in the same step, only when it is this provider's and bound to this
        browser: a callback replayed without the right pre-login cookie must not use up the real one."""
        ...

    def count(self) -> int: ...
    def snapshot(self) -> list[Session]: ...  # what this process holds, for the debugging commands
    up: bool  # false while the store cannot answer (readiness)


_Keys = str | set[str]  # the storage keys an index entry names: one (most users) as itself, a set costs ~200 B


def _add(index: dict[str, _Keys], name: str, key: str) -> None:
    held = index.get(name)
    if held is None:
        index[name] = key
    elif isinstance(held, str):
        index[name] = {held, key}
    else:
        held.add(key)


def _remove(index: dict[str, _Keys], name: str, key: str) -> None:
    """Forget `key` under `name`; tolerant of a key already gone (replacing an entry may expire it too)."""
    held = index.get(name)
    if held == key:
        del index[name]
    elif isinstance(held, set):
        held.discard(key)
        if len(held) == 1:
            index[name] = held.pop()


class _Sessions(TLRUCache[str, Session]):
    """Sessions by storage key, each expiring at its `expires_at`, with the indexes sign-out needs: by
    provider and user, by IdP session. Every way an entry leaves (delete, expiry, eviction of the least
    recently used, replacement, clear) updates them, so they never outgrow the store."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize, ttu=lambda _k, s, _now: s.expires_at, timer=time.time)
        self.by_user: dict[str, dict[str, _Keys]] = {}  # provider -> sub -> keys (no (provider, sub) tuple per session)
        self.by_sid: dict[str, _Keys] = {}

    def __setitem__(self, key: str, session: Session) -> None:
        if Cache.__contains__(self, key):  # Cache's view: present even when expired and not yet purged
            self._unindex(key, Cache.__getitem__(self, key))
        super().__setitem__(key, session)
        if Cache.__contains__(self, key):  # not when it was already expired
            self._index(key, session)

    def __delitem__(self, key: str) -> None:
        session = Cache.__getitem__(self, key)
        try:
            super().__delitem__(key)  # a KeyError too when it had expired, once it is gone
        finally:
            self._unindex(key, session)

    def expire(self, time: float | None = None) -> list[tuple[str, Session]]:
        expired: list[tuple[str, Session]] = super().expire(time)
        for key, session in expired:
            self._unindex(key, session)
        return expired

    def clear(self) -> None:
        super().clear()
        self.by_user.clear()
        self.by_sid.clear()

    def delete_all(self, keys: _Keys | None) -> int:
        """Delete the sessions an index entry names; how many of them had not expired yet."""
        ended = 0
        for key in [keys] if isinstance(keys, str) else list(keys or ()):
            try:
                del self[key]
                ended += 1
            except KeyError:  # it had expired: gone now, and not counted
                pass
        return ended

    def _index(self, key: str, session: Session) -> None:
        _add(self.by_user.setdefault(session.provider, {}), session.sub, key)
        if session.idp_sid:
            _add(self.by_sid, session.idp_sid, key)

    def _unindex(self, key: str, session: Session) -> None:
        users = self.by_user.get(session.provider, {})
        _remove(users, session.sub, key)
        if not users:
            self.by_user.pop(session.provider, None)
        if session.idp_sid:
            _remove(self.by_sid, session.idp_sid, key)


class MemoryStore:
    """Sessions in this process, expiring on their own (cachetools), indexed so that ending every session
    of a user or of an IdP session touches only those (a walk took 2.6 s at 1,000,000 sessions)."""

    def __init__(self, max_sessions: int = 1_000_000, max_logins: int = 100_000) -> None:
        self._sessions = _Sessions(max_sessions)
        self._logins: TTLCache[str, PendingLogin] = TTLCache(maxsize=max_logins, ttl=LOGIN_TTL)

    async def get(self, provider: str, session_id: str) -> Session | None:
        return self.cached(provider, session_id)

    def cached(self, provider: str, session_id: str) -> Session | None:
        session = self._sessions.get(storage_key(session_id))
        return session if session is not None and session.provider == provider else None

    async def put(self, session_id: str, session: Session) -> None:
        self._sessions[storage_key(session_id)] = session

    async def delete(self, provider: str, session_id: str) -> None:
        if await self.get(provider, session_id) is not None:
            del self._sessions[storage_key(session_id)]

    up = True

    async def delete_user(self, provider: str, sub: str) -> int:
        return self._sessions.delete_all(self._sessions.by_user.get(provider, {}).get(sub))

    async def delete_idp_session(self, idp_sid: str) -> int:
        return self._sessions.delete_all(self._sessions.by_sid.get(idp_sid))

    async def put_login(self, state: str, login: PendingLogin) -> None:
        self._logins[storage_key(state)] = login

    async def take_login(self, state: str, provider: str, browser_binding: str) -> PendingLogin | LoginRefused:
        """Look, then pop: nothing else runs in between (no await), so a login is still used once."""
        key = storage_key(state)
        login = self._logins.get(key)
        if login is None or login.provider != provider:
            return LoginRefused.UNKNOWN
        if not hmac.compare_digest(login.browser_binding, browser_binding):
            return LoginRefused.OTHER_BROWSER
        if self._logins.pop(key, None) is None:  # it expired in the microseconds since the look
            return LoginRefused.UNKNOWN
        return login

    def count(self) -> int:
        self._sessions.expire()
        return len(self._sessions)

    def snapshot(self) -> list[Session]:
        self._sessions.expire()
        return list(self._sessions.values())
