"""The decision record: what the outpost decided about a flow, and why.

One plain dict on `flow.metadata["outpost"]` (so flows can be saved and shown in mitmweb),
mirrored as a one-line `flow.comment` and a mark. Its `code` is a short fixed reason code,
which logs and metrics read; its `reason` is the sentence for people. Nobody re-derives a
decision. Per-request working data that must never be serialised
(cookie values, the session) lives in `Exchange`, in an attribute of the flow that mitmproxy's
state (`get_state`: saved flows, mitmweb, copies) does not hold.
"""

import logging
import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from mitmproxy import http

from .forwarded import OriginalRequest, ProxyKind
from .provider import Provider
from .sessions import Session
from .verdict import Verdict

if TYPE_CHECKING:
    from .embedded import EmbeddedBackend

logger = logging.getLogger("mitm_outpost")
# mitmproxy sets the root logger to DEBUG and every record becomes an event for every addon,
# so a line per request costs more than the decision itself: off unless outpost_log_decisions.
logger.setLevel(logging.INFO)

METADATA_KEY = "outpost"


class Outcome(StrEnum):
    ALLOWED = "allowed"  # proxied upstream with identity headers
    SKIPPED = "skipped"  # proxied upstream without identity: an unauthenticated-path rule matched
    REDIRECTED = "redirected"  # sent to log in
    DENIED = "denied"  # answered with an error status
    ENDPOINT = "endpoint"  # answered by one of the outpost's own endpoints
    BACKEND = "backend"  # embedded mode: passed to the authentik server, without identity


MARKS = {
    Outcome.ALLOWED: ":white_check_mark:",
    Outcome.SKIPPED: ":unlock:",
    Outcome.REDIRECTED: ":arrow_right_hook:",
    Outcome.DENIED: ":no_entry:",
    Outcome.ENDPOINT: ":gear:",
    Outcome.BACKEND: ":arrow_right:",
}


@dataclass(slots=True)
class Exchange:
    """What the addons of the chain hand each other about one request."""

    provider: Provider | None = None
    path: str = ""  # as sent, without the query
    query: str = ""
    normal_path: str | None = None  # what the rules judge; None when servers could read it differently
    session_cookie: str = ""
    login_cookie: str = ""
    session: Session | None = None
    set_cookies: list[str] = field(default_factory=list)
    proxied: bool = False  # sent upstream (not answered by the outpost)
    header_auth_failed: bool = False  # an Authorization header was tried and did not authenticate
    deferred: bool = False  # an endpoint that needs the body answers in the `request` hook
    body_limit: int = 0  # for a deferred endpoint: the most body bytes it reads (the edge answers 413 beyond)
    forward: tuple[ProxyKind, OriginalRequest] | None = None  # a forward-auth check, and what it asks about
    by_header: bool = False  # the session came from an Authorization header, not the cookie
    verdict: Verdict | None = None  # the Gate's decision; only ALLOW and SKIP go upstream
    embedded: "EmbeddedBackend | None" = None  # embedded mode: this request goes to the authentik server
    trusted_peer: bool = False  # the peer is a trusted proxy (its forwarded facts and client-certificate headers count)
    client_certificate: str = ""  # embedded mode: the client's TLS certificate, as X-Forwarded-Client-Cert
    forwarded: tuple[tuple[bytes, bytes], ...] = ()  # Host and X-Forwarded-* as Upstream sets them
    verify_tls: bool = True  # the upstream's certificate is checked (the provider's internal_host_ssl_validation)
    sent_fields: tuple[tuple[bytes, bytes], ...] | None = None  # the header tuple Upstream made


EXCHANGE_ATTRIBUTE = "_outpost_exchange"  # a plain attribute: each step asks for it, a weak-key lookup cost 0.4 µs


def begin(flow: http.HTTPFlow, path: str, query: str) -> Exchange:
    exchange = Exchange(path=path, query=query)
    setattr(flow, EXCHANGE_ATTRIBUTE, exchange)
    flow.metadata[METADATA_KEY] = {}
    return exchange


def exchange_of(flow: http.HTTPFlow) -> Exchange | None:
    return getattr(flow, EXCHANGE_ATTRIBUTE, None)


def undecided(flow: http.HTTPFlow) -> Exchange | None:
    """The exchange of a request that has a provider and no answer yet: what each addon works on."""
    exchange: Exchange | None = getattr(flow, EXCHANGE_ATTRIBUTE, None)
    if flow.response is not None or exchange is None or exchange.provider is None or exchange.deferred:
        return None
    return exchange


def embedded_undecided(flow: http.HTTPFlow) -> Exchange | None:
    """The exchange of a request bound for the authentik server (embedded mode), not yet answered."""
    exchange: Exchange | None = getattr(flow, EXCHANGE_ATTRIBUTE, None)
    if flow.response is not None or exchange is None or exchange.embedded is None:
        return None
    return exchange


def note(flow: http.HTTPFlow, **fields: str) -> None:
    """Add facts (provider, mode, user, session, ...) to the record without deciding."""
    flow.metadata.setdefault(METADATA_KEY, {}).update(fields)


def decide(flow: http.HTTPFlow, outcome: Outcome, code: str, reason: str, level: int = logging.DEBUG) -> None:
    """`code`: a short fixed reason code; `reason`: the sentence, never with a query string."""
    record = flow.metadata.setdefault(METADATA_KEY, {})
    record["outcome"] = outcome.value
    record["code"] = str(code)
    record["reason"] = reason
    who = f" [{record['provider']}]" if record.get("provider") else ""
    flow.comment = f"outpost{who}: {outcome.value} ({code}): {reason}"
    flow.marked = MARKS[outcome]
    if logger.isEnabledFor(level):  # the arguments cost more than the check (Host is a scan of every header)
        logger.log(level, "%s %s%s %s (%s): %s", printable(flow.request.method),
                   printable(flow.request.host_header or ""),
                   printable(flow.request.path.partition("?")[0]), outcome.value, code, printable(reason))


def printable(text: str, limit: int = 200) -> str:
    """A client-supplied string as a log line may hold it: every control or other unprintable character
    escaped (C0, DEL, C1, line separators, lone surrogates: no forged lines), bounded."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


def without_query(url: str) -> str:
    """A URL as logs and decision records show it: never its query string or fragment."""
    return url.partition("?")[0].partition("#")[0]


def where(error: BaseException) -> str:
    """An exception as a flow's log line may show it: its type and where it was raised, never its
    message or a traceback (either can quote a header, a query string or a body)."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"
