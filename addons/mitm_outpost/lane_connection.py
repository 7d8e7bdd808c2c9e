"""One client connection of the fast lane (fast_lane.py): heads held to the edge's rules and parsed
with httptools, the outpost's own requests answered through the chain, everything else handed
to mitmproxy with the bytes already read.

The request a check becomes is mitmproxy's own `http.Request`, built without the checks
mitmproxy repeats on every message (`make_request`), with headers looked up through an index
(`IndexedHeaders`): the chain's steps cannot tell it from a request mitmproxy parsed.
"""

import asyncio
import itertools
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import httptools
from mitmproxy import connection, http
from mitmproxy.net.http import http1

from . import pages
from .decision import where
from .edge_rules import HEADER_TIMEOUT, Refusal, framing_violation, head_violation, incomplete_head_violation
from .endpoints import BACKCHANNEL_BODY_LIMIT
from .forwarded import auth_kind
from .prometheus_metrics import EDGE_REFUSALS
from .routing import OWN_PATHS
from .strict_http import LINGER_SECONDS, MAX_LEADING_EMPTY_LINES, refusal_bytes

if TYPE_CHECKING:
    from .fast_lane import FastLane

logger = logging.getLogger("mitm_outpost")

BODY_LIMIT = BACKCHANNEL_BODY_LIMIT  # the most body the fast lane reads; a larger one goes to mitmproxy
SLICE = 0.0005  # seconds of lane work per event-loop iteration, at least one request (see FastLane.run)
IDLE_TIMEOUT = 300.0  # seconds a keep-alive connection may wait between requests
SWEEP_INTERVAL = 1.0  # seconds between the checks of heads in pieces and idle connections

def answered_here(target: bytes) -> bool:
    """A request the outpost always answers itself: a forward-auth check or one of its endpoints."""
    path, _, query = target.decode("ascii").partition("?")  # the head grammar allows visible ASCII only
    return path in OWN_PATHS or auth_kind(path, query) is not None


class Head:
    """What httptools reports of one request head."""

    __slots__ = ("url", "fields")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


_lookup_keys: dict[str, bytes] = {}  # a looked-up name, as the index holds it
_NONE: list[str] = []


class IndexedHeaders(http.Headers):  # type: ignore[misc]
    """mitmproxy's Headers, looked up by name through an index made once per field tuple.

    A forward-auth check asks about a dozen names (Host, X-Original-URL, Accept, Cookie, the
    framing fields, ...), and each lookup of mitmproxy's Headers lowercases and compares every
    field again: about 15 % of a check's CPU. Any change to the headers assigns a new `fields`
    tuple, which makes the index stale; it is made again at the next lookup."""

    _indexed: tuple[tuple[bytes, bytes], ...] = ()
    _index: dict[bytes, list[str]] = {}

    def _values(self, name: str | bytes) -> list[str]:
        fields = self.fields
        if fields is not self._indexed:
            index: dict[bytes, list[str]] = {}
            for key, value in fields:
                index.setdefault(key.lower(), []).append(value.decode("utf-8", "surrogateescape"))
            self._indexed, self._index = fields, index
        key = _lookup_keys.get(name) if isinstance(name, str) else None
        if key is None:
            key = (name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")).lower()
            if isinstance(name, str) and len(_lookup_keys) < 256:  # the names the code asks for: a few dozen
                _lookup_keys[name] = key
        return self._index.get(key, _NONE)

    # The same answers as mitmproxy's Mapping-based ones, without their three layers of calls.
    def get_all(self, name: str | bytes) -> list[str]:
        return list(self._values(name))

    def get(self, name: str | bytes, default: Any = None) -> Any:
        values = self._values(name)
        return default if not values else values[0] if len(values) == 1 else ", ".join(values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, bytes)) and bool(self._values(name))


def make_request(method: bytes, target: bytes, version: bytes, fields: list[tuple[bytes, bytes]],
                 content: bytes, started: float) -> http.Request:
    """A request as mitmproxy's reverse mode makes it, from the parser's fields (pages.unchecked)."""
    headers = object.__new__(IndexedHeaders)  # httptools gives bytes only: Headers.__init__ checks no more
    headers.fields = tuple(fields)
    request = object.__new__(http.Request)
    request.data = pages.unchecked(
        http.RequestData, host="127.0.0.1", port=1, method=method, scheme=b"http", authority=b"", path=target,
        http_version=version, headers=headers, content=content, trailers=None,
        timestamp_start=started, timestamp_end=time.time())
    request.stream = False
    return request


_FLOW_ID_PREFIX = str(uuid.uuid4())[:24]  # this process's; a counter makes the rest of each flow's id
_flow_numbers = itertools.count()


def make_flow(client: connection.Client, server: connection.Server) -> http.HTTPFlow:
    """A live flow as `HTTPFlow(client, server, live=True)` makes it, without a uuid4 per check (its
    random bytes and formatting were 8 % of a check): ids stay UUID-shaped and unique, a random
    prefix per process and a counter."""
    flow = object.__new__(http.HTTPFlow)
    flow.__dict__.update(
        id=f"{_FLOW_ID_PREFIX}{next(_flow_numbers) % 2 ** 48:012x}", client_conn=client, server_conn=server, live=True,
        timestamp_created=time.time(), intercepted=False, _resume_event=None, _backup=None, marked="",
        is_replay=None, metadata={}, comment="")
    return flow


_heads: dict[tuple[Any, ...], bytes] = {}
HEAD_MEMO_SIZE = 4096  # answer heads kept; a check's carries its user's identity headers


def response_head(response: http.Response) -> bytes:
    """`http1.assemble_response_head`, remembered: a signed-in user's checks get the same answer again and
    again. Answers that set a cookie (logins, callbacks, a cleared session) are one-offs: never kept."""
    data = response.data
    key = (data.http_version, data.status_code, data.reason, data.headers.fields)
    head = _heads.get(key)
    if head is None:
        head = http1.assemble_response_head(response)  # as mitmproxy's HTTP/1 server writes it
        if not any(name.lower() == b"set-cookie" for name, _ in data.headers.fields):
            if len(_heads) >= HEAD_MEMO_SIZE:
                _heads.clear()
            _heads[key] = head
    return head


class Connection(asyncio.Protocol):
    """One client connection on the fast lane, until it closes or is handed to mitmproxy."""

    def __init__(self, lane: "FastLane") -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.client: connection.Client | None = None
        self.buf = bytearray()
        self.busy = False  # a request is being answered; what arrives meanwhile waits in `buf`
        self.queued = False  # in the lane's run queue
        self.closing = False
        self.write_paused = False  # the client does not read: no more answers until it does
        self.reading_paused = False  # we do not read: a request is being answered and much more is waiting
        self.eof = False  # the client will send nothing more
        self.awaiting = 0  # the bytes a whole request needs, while its body is still coming
        self.head_since: float | None = None  # when the unfinished head (or body) began arriving
        self.last_active = 0.0

    # A TCP listener's: a stream transport (uvloop's is not a subclass of asyncio.Transport).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer, sock = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        self.client = connection.Client(peername=peer[:2], sockname=sock[:2], timestamp_start=time.time())
        self.last_active = time.monotonic()
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.lane.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after an answer with Connection: close
        self.buf += data
        if (self.busy or self.write_paused) and len(self.buf) > self.lane.limits.header_size + BODY_LIMIT:
            assert self.transport is not None
            self.transport.pause_reading()  # TCP holds the rest until this connection can take a request again
            self.reading_paused = True
        self.wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.wake()
        return True  # half-open until our answers are out

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume_reading()
        self.wake()

    def resume_reading(self) -> None:
        if self.reading_paused and not (self.busy or self.write_paused) and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def wake(self) -> None:
        """There may be a request to take: queue for the lane's next turn (FastLane.run)."""
        if not (self.queued or self.busy or self.closing or self.write_paused):
            self.queued = True
            self.lane.run_queue.append(self)
            self.lane.schedule()

    def take_turn(self) -> None:
        """The lane's turn for this connection: one request, and a place at the back of the queue for the next."""
        self.queued = False
        if self.busy or self.closing or self.write_paused:
            return
        if self.take_request():
            if self.buf or self.eof:  # a pipelined request, or the close: otherwise data_received wakes us
                self.wake()
        elif self.eof and not (self.busy or self.closing):
            self.close()  # nothing more will come, and nothing is left to answer

    def take_request(self) -> bool:
        """Take the next request from `buf`, if a whole one is there; True if it was answered already."""
        buf, limits = self.buf, self.lane.limits
        for _ in range(MAX_LEADING_EMPTY_LINES):
            if buf[:2] != b"\r\n":
                break
            del buf[:2]
        if not buf:
            self.head_since = None
            return False
        if len(buf) < self.awaiting:
            return False  # the head was judged already; its body is still coming
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if refusal := incomplete_head_violation(bytes(buf), limits):
                self.refuse(refusal)
            elif self.head_since is None:
                self.head_since = time.monotonic()
            return False
        head = bytes(buf[:end + 4])
        if refusal := head_violation(head, limits):
            self.refuse(refusal)
            return False
        target = head[:head.index(b"\r\n")].split(b" ", 2)[1]
        if not answered_here(target):
            self.hand_over()
            return False
        parsed = Head()
        parser = httptools.HttpRequestParser(parsed)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # the latter: CONNECT, Connection: Upgrade
            # A head of the edge's grammar that httptools will not take (an unknown method, say):
            # mitmproxy's strict layer answers it, exactly as under mitmdump.
            self.hand_over()
            return False
        method, version = parser.get_method(), b"HTTP/" + parser.get_http_version().encode()
        request = make_request(method, parsed.url, version, parsed.fields, b"", time.time())
        if code := framing_violation(request):
            self.refuse(Refusal(400, code))
            return False
        # Framing as checked just now: chunked alone, or at most one Content-Length of digits.
        headers = request.headers
        size = None if "transfer-encoding" in headers else int(headers.get("content-length") or 0)
        if size is None or size > BODY_LIMIT or "expect" in headers:
            self.hand_over()  # a chunked or large body, or Expect: mitmproxy's strict layer reads those
            return False
        if len(buf) < len(head) + size:
            self.awaiting = len(head) + size
            if self.head_since is None:
                self.head_since = time.monotonic()
            return False  # the body is still coming
        request.data.content = bytes(buf[len(head):len(head) + size])
        del buf[:len(head) + size]
        self.head_since, self.awaiting = None, 0
        self.busy = True
        keep_alive = not http1.connection_close(request.data.http_version, request.headers)  # mitmproxy's rule
        flow = make_flow(self.client, self.lane.server_placeholder())
        flow.request = request
        if (pending := self.lane.answer(flow)) is None:  # no step waited: answered already, no task needed
            self.answered(flow, keep_alive, None)
            return not self.closing
        # A step waits (IdP, Redis): the rest of the chain as a task, started at once.
        task = asyncio.Task(pending, loop=asyncio.get_running_loop(), eager_start=True)
        if task.done():
            self.answered(flow, keep_alive, task)
            return not self.closing
        task.add_done_callback(lambda t: self.answered_later(flow, keep_alive, t))
        return False

    def answered_later(self, flow: http.HTTPFlow, keep_alive: bool, task: asyncio.Future[None]) -> None:
        try:
            self.answered(flow, keep_alive, task)
        except Exception as e:  # a bug of ours, outside the lane's turn: fail closed here, not by the idle timeout
            logger.error("fast lane: answering failed (%s); refused", where(e))
            self.refuse(Refusal(403, "step_failed"))
            return
        self.wake()

    def answered(self, flow: http.HTTPFlow, keep_alive: bool, task: asyncio.Future[None] | None) -> None:
        """`task`: the one that finished answering, None when the chain answered at once."""
        self.busy = False
        self.resume_reading()
        failed = task is not None and (task.cancelled() or task.exception() is not None)
        if failed or flow.response is None or self.transport is None:
            if task is not None and not task.cancelled() and task.exception() is not None:
                logger.error("fast lane: answering failed (%s); the request is refused",
                             type(task.exception()).__name__)
            self.refuse(Refusal(403, "step_failed"))  # fail closed, as the chain does
            return
        if self.closing:
            return
        response = flow.response
        head = response_head(response)
        # The outpost's own answers are never chunked: the body follows as it is, but never after HEAD.
        self.transport.write(head if flow.request.data.method.upper() == b"HEAD" or not response.data.content
                             else head + response.data.content)
        self.last_active = time.monotonic()
        if not keep_alive:
            self.close_after_answer()

    def refuse(self, refusal: Refusal) -> None:
        peer = self.client.peername if self.client else None
        logger.warning("edge: refused a request from %s: %s (%d)", peer[0] if peer else "?", refusal.code,
                       refusal.status)
        EDGE_REFUSALS.labels(refusal.code).inc()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(refusal_bytes(refusal))
        self.close_after_answer()

    def close_after_answer(self) -> None:
        """As the strict layer does: our side closes now, and what the client still sends is dropped
        for a moment, so its unread bytes do not reset the connection before it has read the answer."""
        self.closing = True
        self.buf.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def hand_over(self) -> None:
        """From now on mitmproxy serves this connection: it reads the bytes we hold first."""
        self.lane.connections.discard(self)
        transport, self.transport = self.transport, None
        assert transport is not None
        self.closing = True
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.reading_paused:
            transport.resume_reading()  # mitmproxy's reader applies its own flow control from here
        if self.buf:
            reader.feed_data(bytes(self.buf))
            self.buf.clear()
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.lane.hand_to_mitmproxy(reader, writer)

    def overdue(self, now: float) -> bool:
        """Called by the lane's sweep: a head or body that takes too long, or an idle connection."""
        if self.closing or self.busy:
            return False
        if self.head_since is not None and now - self.head_since > self.lane.limits.header_timeout:
            self.refuse(HEADER_TIMEOUT)
            return True
        if self.head_since is None and not self.buf and now - self.last_active > IDLE_TIMEOUT:
            self.close()
            return True
        return False
