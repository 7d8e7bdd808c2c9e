"""Server-side sessions and logins in progress, behind one small interface.

The browser holds only an opaque random id; the store keys everything by a hash of it, so
a dump of the store yields no usable cookie. The interface is async so that a networked
store (Redis) drops in without any addon changing.
"""

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import TLRUCache, TTLCache

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


class StoreUnavailable(Exception):
    """The store cannot answer (Redis down or slow): requests fail closed with 503."""


class SessionStore(Protocol):
    async def get(self, provider: str, session_id: str) -> Session | None: ...
    async def put(self, session_id: str, session: Session) -> None: ...
    async def delete(self, provider: str, session_id: str) -> None: ...
    async def delete_user(self, provider: str, sub: str) -> int: ...
    async def delete_idp_session(self, idp_sid: str) -> int: ...
    async def put_login(self, state: str, login: PendingLogin) -> None: ...
    async def take_login(self, state: str) -> PendingLogin | None: ...
    def count(self) -> int: ...
    def snapshot(self) -> list[Session]: ...  # what this process holds, for the debugging commands
    up: bool  # false while the store cannot answer (readiness)


class MemoryStore:
    """Sessions in this process, expiring on their own (cachetools)."""

    def __init__(self, max_sessions: int = 1_000_000, max_logins: int = 100_000) -> None:
        self._sessions: TLRUCache[str, Session] = TLRUCache(
            maxsize=max_sessions, ttu=lambda _k, s, _now: s.expires_at, timer=time.time
        )
        self._logins: TTLCache[str, PendingLogin] = TTLCache(maxsize=max_logins, ttl=LOGIN_TTL)

    async def get(self, provider: str, session_id: str) -> Session | None:
        session = self._sessions.get(storage_key(session_id))
        return session if session is not None and session.provider == provider else None

    async def put(self, session_id: str, session: Session) -> None:
        self._sessions[storage_key(session_id)] = session

    async def delete(self, provider: str, session_id: str) -> None:
        if await self.get(provider, session_id) is not None:
            del self._sessions[storage_key(session_id)]

    up = True

    async def delete_user(self, provider: str, sub: str) -> int:
        return self._delete_where(lambda s: s.provider == provider and s.sub == sub)

    async def delete_idp_session(self, idp_sid: str) -> int:
        return self._delete_where(lambda s: bool(idp_sid) and s.idp_sid == idp_sid)

    def _delete_where(self, match) -> int:  # type: ignore[no-untyped-def]
        self._sessions.expire()
        doomed = [key for key, session in self._sessions.items() if match(session)]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    async def put_login(self, state: str, login: PendingLogin) -> None:
        self._logins[storage_key(state)] = login

    async def take_login(self, state: str) -> PendingLogin | None:
        return self._logins.pop(storage_key(state), None)

    def count(self) -> int:
        self._sessions.expire()
        return len(self._sessions)

    def snapshot(self) -> list[Session]:
        self._sessions.expire()
        return list(self._sessions.values())
