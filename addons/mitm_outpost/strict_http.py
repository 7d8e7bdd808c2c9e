"""The outpost's own HTTP/1 layers, which the Edge addon (edge.py) puts in place of mitmproxy's.

mitmproxy's HTTP layers are lenient where an identity proxy must not be:

- `StrictHttp1Server` holds each request head to `edge_rules` (no bare CR/LF, NUL or other
  controls, no obs-fold, token methods, HTTP/1.0 and 1.1 only, bounded sizes) and answers
  a refused head with 4xx and a close before any addon sees it; chunked bodies are read
  strictly; a head that does not arrive in time is answered 408.
- `StrictHttpStream` answers a request the outpost decided on at once, whatever body is
  still coming (the body is discarded, never buffered or logged), caps the body of the one
  endpoint that reads one, and turns upstream failures and timeouts into 502/504 pages that
  name no address.
- `StrictHttpLayer` makes those streams, keeps one upstream-response timer per client
  connection, and never lets a connection opened without certificate checks serve another flow.
"""

import functools
import logging
import time
import weakref
from http import HTTPStatus

from mitmproxy import http
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    ResponseTrailers,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.utils import human

from . import pages
from .decision import exchange_of, note
from .edge_rules import (
    HEADER_TIMEOUT,
    PIPELINE_TOO_LARGE,
    Limits,
    Refusal,
    StrictChunkedReader,
    framing_violation,
    head_violation,
    incomplete_head_violation,
)
from .prometheus_metrics import EDGE_REFUSALS

logger = logging.getLogger("mitm_outpost")

LINGER_SECONDS = 2.0  # after an early answer: time for the client to read it before the close
MAX_LEADING_EMPTY_LINES = 8  # RFC 9112 §2.2: a server SHOULD ignore at least one
CONNECT_TIMEOUT = "upstream connect timeout"
SERVER_EVENTS = (ResponseHeaders, ResponseData, ResponseTrailers, ResponseEndOfMessage, ResponseProtocolError)
UNVERIFIED: "weakref.WeakSet[Server]" = weakref.WeakSet()  # upstream connections opened without certificate checks


@functools.cache
def refusal_bytes(refusal: Refusal) -> bytes:
    phrase = HTTPStatus(refusal.status).phrase
    response = http.Response.make(refusal.status, f"{phrase}: {refusal.code}\n", {
        "Content-Type": "text/plain; charset=utf-8", "Connection": "close", **pages.NO_STORE,
    })
    return http1.assemble_response(response)


class StrictHttp1Server(_http1.Http1Server):
    def __init__(self, context, limits: Limits) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        self.limits = limits
        self.head_timer: commands.RequestWakeup | None = None
        self.linger_timer: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is self.head_timer and self.state == self.read_headers:
                yield from self.refuse(HEADER_TIMEOUT)
            elif event.command is self.linger_timer:
                yield commands.CloseConnection(self.conn)
            return
        yield from super()._handle_event(event)
        if self.state == self.wait and len(self.buf) > self.limits.header_size:
            # Bytes piling up behind a request still being answered: no answer can go in front of its own.
            logger.warning("edge: closed a connection from %s: %s",
                           self.conn.peername[0] if self.conn.peername else "?", PIPELINE_TOO_LARGE.code)
            EDGE_REFUSALS.labels(PIPELINE_TOO_LARGE.code).inc()
            self.buf.maybe_extract_at_most(len(self.buf))
            yield commands.CloseConnection(self.conn)
            self.state = self.done

    def start_head_timer(self) -> layer.CommandGenerator[None]:
        self.head_timer = commands.RequestWakeup(self.limits.header_timeout)
        yield self.head_timer

    def refuse(self, refusal: Refusal) -> layer.CommandGenerator[None]:
        peer = self.conn.peername
        logger.warning("edge: refused a request from %s: %s (%d)", peer[0] if peer else "?", refusal.code,
                       refusal.status)
        EDGE_REFUSALS.labels(refusal.code).inc()
        yield commands.SendData(self.conn, refusal_bytes(refusal))
        yield from self.close_after_answer()

    def close_after_answer(self) -> layer.CommandGenerator[None]:
        """Close our side now and drop whatever the client still sends, then close: a plain close
        with unread bytes would reset the connection before the client has read our answer."""
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        self.state = self.linger
        self.linger_timer = commands.RequestWakeup(LINGER_SECONDS)
        yield self.linger_timer

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)  # never log what a client left unfinished
            return
        assert isinstance(event, events.DataReceived)
        for _ in range(MAX_LEADING_EMPTY_LINES):
            if bytes(self.buf)[:2] != b"\r\n":
                break
            self.buf.maybe_extract_at_most(2)
        pending = bytes(self.buf)
        end = pending.find(b"\r\n\r\n")
        if end < 0:
            if refusal := incomplete_head_violation(pending, self.limits):
                yield from self.refuse(refusal)
            elif self.head_timer is None:  # a head in pieces: from now on it has outpost_header_timeout
                yield from self.start_head_timer()
            return
        head = bytes(self.buf.maybe_extract_at_most(end + 4) or b"")
        if refusal := head_violation(head, self.limits):
            yield from self.refuse(refusal)
            return
        try:
            request = http1.read_request_head(head.split(b"\r\n")[:-2])
            expected_size = http1.expected_http_body_size(request)
        except ValueError:
            yield from self.refuse(Refusal(400, "framing"))
            return
        if code := framing_violation(request):
            yield from self.refuse(Refusal(400, code))
            return
        self.head_timer = None
        self.request = request
        yield _http1.ReceiveHttp(RequestHeaders(self.stream_id, request, expected_size == 0))
        self.body_reader = (StrictChunkedReader(self.limits) if expected_size is None
                            else _http1.make_body_reader(expected_size))
        self.state = self.read_body
        yield from self.state(event)

    def send(self, event: http_layers.HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseData) and self.request is not None and self.request.method.upper() == "HEAD":
            return  # an answer the outpost made has a body, but a HEAD answer never carries one (RFC 9110 §9.3.2)
        if isinstance(event, ResponseHeaders) and not self.request_done and event.response.status_code >= 200:
            event.response.headers["Connection"] = "close"  # answered before its body arrived (StrictHttpStream)
        answered_early = isinstance(event, ResponseEndOfMessage) and not self.request_done
        yield from super().send(event)
        if answered_early and self.conn.state & ConnectionState.CAN_WRITE:
            yield from self.close_after_answer()  # the request's body is still coming

    def linger(self, event: events.Event) -> layer.CommandGenerator[None]:
        self.buf.maybe_extract_at_most(len(self.buf))
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)



class StrictHttpStream(http_layers.HttpStream):
    def __init__(self, context, stream_id: int, limits: Limits) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context, stream_id)
        self.limits = limits
        # the request is upstream, its response not begun (StrictHttpLayer's timer)
        self.waiting_since: float | None = None
        self.streamed = 0  # request body bytes streamed upstream so far
        self.answered = False  # answered by the edge itself (answer_now)

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Before Layer's own routing: mitmproxy replaces `_handle_event` once a WebSocket takes over.
        if self.answered and isinstance(event, SERVER_EVENTS):
            return  # the edge answered this request; what the upstream still sends is dropped
        yield from super().handle_event(event)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Here, inside Layer's routing, so that the hooks of the 504 pause this stream only.
        if isinstance(event, UpstreamOverdue):
            if self.is_waiting_upstream():
                note(self.flow, upstream_error="no response within outpost_upstream_timeout")
                logger.warning("upstream %s: no response within %ss",
                               human.format_address(self.flow.server_conn.address), self.limits.upstream_timeout)
                yield commands.CloseConnection(self.context.server)
                yield from self.answer_now(upstream_failure(504))
            return
        yield from super()._handle_event(event)

    def is_waiting_upstream(self) -> bool:
        return (self.waiting_since is not None and self.child_layer is None and not self.answered
                and self.server_state == self.state_wait_for_response_headers)

    def state_wait_for_response_headers(self, event: ResponseHeaders) -> layer.CommandGenerator[None]:
        self.waiting_since = None
        yield from super().state_wait_for_response_headers(event)
        if self.flow.response is not event.response and not self.answered:
            # An addon replaced the upstream's answer (Upstream: an unasked 101; Chain: a failed check):
            # the upstream's body must not follow it.
            yield commands.CloseConnection(self.context.server)
            yield from self.answer_now(self.flow.response)

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        yield from super().state_wait_for_request_headers(event)
        if (self.flow.response is not None and not event.end_stream
                and self.client_state == self.state_consume_request_body):
            note(self.flow, request_body="discarded")
            yield from self.answer_now(self.flow.response)

    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        exchange = exchange_of(self.flow)
        limit = exchange.body_limit if exchange is not None else 0
        if isinstance(event, RequestData) and limit and len(self.request_body_buf) + len(event.data) > limit:
            yield from self.too_large(f"over {limit} bytes, discarded", f"This endpoint reads at most {limit} bytes.")
            return
        yield from super().state_consume_request_body(event)
        if isinstance(event, RequestEndOfMessage):
            yield from self.start_upstream_timer()

    def state_stream_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        exchange = exchange_of(self.flow)
        if isinstance(event, RequestData) and exchange is not None and exchange.body_limit:
            self.streamed += len(event.data)
            if self.streamed > exchange.body_limit:  # a chunked body past the limit, already partly upstream
                yield commands.CloseConnection(self.context.server)
                yield from self.too_large(f"over {exchange.body_limit} bytes, cut off",
                                          f"At most {exchange.body_limit} bytes.")
                return
        yield from super().state_stream_request_body(event)
        if isinstance(event, RequestEndOfMessage):
            yield from self.start_upstream_timer()

    def too_large(self, recorded: str, told: str) -> layer.CommandGenerator[None]:
        """413 for a body over the endpoint's limit: `recorded` on the flow, `told` to the client."""
        note(self.flow, request_body=recorded)
        yield from self.answer_now(pages.page(413, "Payload too large", told))

    def start_upstream_timer(self) -> layer.CommandGenerator[None]:
        if self.server_state == self.state_wait_for_response_headers and self.flow.response is None:
            self.waiting_since = time.monotonic()
        yield from ()

    def state_discard(self, _: events.Event) -> layer.CommandGenerator[None]:
        yield from ()  # the rest of a request that has been answered

    def answer_now(self, response: http.Response) -> layer.CommandGenerator[None]:
        """Send `response` now; whatever the client still sends for this request is dropped, and so is
        whatever the upstream still sends."""
        self.answered = True
        self.flow.response = response
        if self.client_state not in (self.state_done, self.state_errored):
            self.client_state = self.state_discard
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        yield from self.send_response()
        if self.client_state == self.state_discard:
            yield from self.flow_done()

    def handle_protocol_error(self,
                              event: RequestProtocolError | ResponseProtocolError) -> layer.CommandGenerator[None]:
        headers_sent = self.server_state in (self.state_stream_response_body, self.state_done, self.state_errored)
        if isinstance(event, ResponseProtocolError) and event.code.http_status_code() == 502 and not headers_sent \
                and self.client_state != self.state_errored:
            note(self.flow, upstream_error=event.message[:200])
            logger.warning("upstream %s failed: %s", human.format_address(self.flow.server_conn.address),
                           event.message[:200])
            exchange = exchange_of(self.flow)
            if exchange is not None and exchange.embedded is not None:
                yield from self.answer_now(
                    pages.server_starting("application/json" in self.flow.request.headers.get("Accept", "")))
            else:
                yield from self.answer_now(upstream_failure(504 if event.message == CONNECT_TIMEOUT else 502))
            return
        yield from super().handle_protocol_error(event)


def upstream_failure(status: int) -> http.Response:
    """What the client learns of a failed upstream: the status, never its address or the error."""
    if status == 504:
        return pages.page(504, "Gateway timeout", "The application did not answer in time. Try again in a moment.")
    return pages.page(502, "Bad gateway", "The application is not reachable right now. Try again in a moment.")


class UpstreamOverdue(events.Event):
    """StrictHttpLayer to a stream: your upstream has not begun its response in time."""


class StrictHttpLayer(http_layers.HttpLayer):
    """One timer per client connection for its requests' upstream responses: a timer per request
    is a task and later an event through the whole layer stack (BENCHMARKS.md), while a connection
    whose requests are answered in time never sees its timer fire more than once a timeout."""

    def __init__(self, context, mode: http_layers.HTTPMode, limits: Limits) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context, mode)
        self.limits = limits
        self.upstream_timer: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and event.command is self.upstream_timer:
            self.upstream_timer = None
            deadline = time.monotonic() - self.limits.upstream_timeout
            for stream in list(self.streams.values()):
                if (isinstance(stream, StrictHttpStream) and stream.is_waiting_upstream()
                        and stream.waiting_since <= deadline):
                    yield from self.event_to_child(stream, UpstreamOverdue())
        else:
            if (isinstance(event, events.Start) and self.context.client.alpn != b"h2"
                    and not http_layers.is_h3_alpn(self.context.client.alpn)):
                self.connections.setdefault(self.context.client, StrictHttp1Server(self.context.fork(), self.limits))
            yield from super()._handle_event(event)
        if self.upstream_timer is None:
            waiting = [s.waiting_since for s in self.streams.values()
                       if isinstance(s, StrictHttpStream) and s.is_waiting_upstream()]
            if waiting:
                due = min(waiting) + self.limits.upstream_timeout - time.monotonic()  # type: ignore[type-var]
                self.upstream_timer = commands.RequestWakeup(max(due, 0.01))
                yield self.upstream_timer

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        stream = self.streams[stream_id] = StrictHttpStream(self.context.fork(), stream_id, self.limits)
        yield from self.event_to_child(stream, events.Start())

    def get_connection(self, event: http_layers.GetHttpConnection, *,
                       reuse: bool = True) -> layer.CommandGenerator[None]:
        """An upstream connection for one flow, checked as that flow's provider says: a connection
        opened without certificate validation is marked (Upstream relaxes its TLS) and serves no
        flow that wants validation, nor the other way round."""
        stream = self.command_sources.get(event)
        exchange = exchange_of(stream.flow) if isinstance(stream, http_layers.HttpStream) and stream.flow else None
        unverified = exchange is not None and not exchange.verify_tls
        if any(event.connection_spec_matches(c) and (c in UNVERIFIED) != unverified for c in self.connections):
            reuse = False
        known = set(self.connections)
        yield from super().get_connection(event, reuse=reuse)
        if unverified:
            UNVERIFIED.update(c for c in self.connections if c not in known and isinstance(c, Server))


class Closing(layer.Layer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield commands.CloseConnection(self.context.client)
