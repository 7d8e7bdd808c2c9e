"""The grammar the outpost's edge holds every request to, before any decision.

mitmproxy parses leniently (a bare CR stays inside a header value, continuation lines are
folded, any version string is taken), and the app behind the outpost may parse the same
bytes differently: Python's http.server splits a value at a bare CR, which turns one header
into two. So a request head is checked here, byte for byte, against RFC 9112 §2-§5 and
RFC 9110 §5.5, and refused whole if it does not match. Pure functions, no I/O.
"""

import re
from dataclasses import dataclass
from typing import NamedTuple

import h11
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import http
from mitmproxy.net.http import validate

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN = re.compile(rb"%s+" % _TCHAR)  # a method or a field name (RFC 9110 §5.6.2)
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"  # VCHAR, obs-text, SP, HTAB: no CR, LF, NUL or other controls
_FIELD_LINE = re.compile(rb"%s+:%s" % (_TCHAR, _FIELD_VALUE))
# The request line: a token method, an origin-form target of visible ASCII, HTTP/1.0 or 1.1.
_REQUEST_LINE = re.compile(rb"%s+ /[\x21-\x7e]* HTTP/1\.[01]" % _TCHAR)
_HEAD = re.compile(rb"%s+ /[\x21-\x7e]* HTTP/1\.[01]\r\n(?:%s+:%s\r\n)*\r\n" % (_TCHAR, _TCHAR, _FIELD_VALUE))
_METHOD = re.compile(rb"%s+" % _TCHAR)
_VALUE = re.compile(_FIELD_VALUE)
_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1", "HTTP/2.0"})
# chunk-size [chunk-ext]: at most 12 significant hex digits (256 TiB), no controls in extensions.
_CHUNK_LINE = re.compile(rb"0*([0-9A-Fa-f]{1,12})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?")
MAX_CHUNK_LINE = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits of the edge (the `outpost_max_*` and `*_timeout` options)."""

    request_line: int = 8192
    header_size: int = 65536
    header_count: int = 100
    header_timeout: int = 10  # seconds (mitmproxy options are int, str or bool)
    upstream_connect_timeout: int = 10
    upstream_timeout: int = 60


class Refusal(NamedTuple):
    status: int
    code: str  # a reason code for logs and metrics; never the offending bytes


REQUEST_LINE_TOO_LONG = Refusal(414, "request_line_too_long")
HEAD_TOO_LARGE = Refusal(431, "header_too_large")
TOO_MANY_FIELDS = Refusal(431, "too_many_header_fields")
HEADER_TIMEOUT = Refusal(408, "header_timeout")
PIPELINE_TOO_LARGE = Refusal(431, "pipelined_data_too_large")


def incomplete_head_violation(data: bytes, limits: Limits) -> Refusal | None:
    """A head still arriving: refused as soon as it is already too long to ever be accepted."""
    line_end = data.find(b"\r\n")
    if (line_end < 0 and len(data) > limits.request_line) or line_end > limits.request_line:
        return REQUEST_LINE_TOO_LONG
    if len(data) > limits.header_size:
        return HEAD_TOO_LARGE
    if b"\n" in data.replace(b"\r\n", b""):
        return Refusal(400, "bare_lf")  # an LF-only line ending: never a complete head to us
    return None


def head_violation(head: bytes, limits: Limits) -> Refusal | None:
    """`head`: the request line and fields up to and including the empty line."""
    if _HEAD.fullmatch(head):
        line_end = head.index(b"\r\n")
        if line_end > limits.request_line:
            return REQUEST_LINE_TOO_LONG
        if len(head) > limits.header_size:
            return HEAD_TOO_LARGE
        if head.count(b"\r\n") - 2 > limits.header_count:
            return TOO_MANY_FIELDS
        return None
    return Refusal(400, _diagnose(head))


def _diagnose(head: bytes) -> str:
    """Which rule a head that failed the grammar broke (for the log line and the 400 page)."""
    lines = head[:-4].split(b"\r\n")
    request_line = lines[0]
    if b"\n" in head.replace(b"\r\n", b""):
        return "bare_lf"
    if not _REQUEST_LINE.fullmatch(request_line):
        method, _, rest = request_line.partition(b" ")
        if not _METHOD.fullmatch(method):
            return "method"
        if not re.fullmatch(rb".* HTTP/1\.[01]", rest):
            return "version"
        return "request_target"
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            return "obs_fold"
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            return "field_name"
        if not _VALUE.fullmatch(value):
            return "field_value_control_character"
    return "syntax"


def framing_violation(request: http.Request) -> str | None:
    """Message framing and routing fields a proxy must refuse rather than guess (RFC 9112 §3.2, §6).
    One pass over the fields: each lookup by name would walk them all again."""
    hosts, codings, lengths = 0, [], []
    for name, value in request.headers.fields:
        key = name.lower()
        if key == b"host":
            hosts += 1
        elif key == b"transfer-encoding":
            codings.append(value.strip().lower())
        elif key == b"content-length":
            lengths.append(value.strip())
    if hosts > 1:
        return "multiple_host"
    if not hosts and request.http_version == "HTTP/1.1":
        return "missing_host"
    if codings:
        if lengths:
            return "content_length_with_transfer_encoding"
        if codings != [b"chunked"]:
            return "transfer_encoding"
    if len(lengths) > 1:
        return "content_length"
    if lengths:
        try:
            validate.parse_content_length(lengths[0])  # mitmproxy's rule: digits, no leading zero
        except ValueError:
            return "content_length"
    return None


def fields_violation(request: http.Request) -> str | None:
    """The same rules for a request that did not come as HTTP/1 bytes (HTTP/2): method, version, values."""
    if request.http_version not in _VERSIONS:
        return "version"
    if not _METHOD.fullmatch(request.data.method):
        return "method"
    for name, value in request.headers.fields:
        if not _METHOD.fullmatch(name.lstrip(b":")) or not _VALUE.fullmatch(value):
            return "field_value_control_character"
    return None


class FramingError(h11.RemoteProtocolError):
    """Bad chunked framing; the message names the rule, never the bytes."""


class StrictChunkedReader:
    """A chunked request body, held to RFC 9112 §7.1: CRLF line endings only, a bounded
    chunk size, trailer fields checked like header fields and then dropped (nothing
    downstream needs them, and an unchecked trailer would be a second, unjudged head)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.remaining = 0
        self.step = self._size
        self.trailer_size = 0

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        while True:
            event = self.step(buf)
            if event is not _AGAIN:
                return event

    def read_eof(self) -> None:
        raise FramingError("the client closed the connection inside a chunked body")

    def _line(self, buf: ReceiveBuffer, limit: int) -> bytes | None:
        line = buf.maybe_extract_next_line()
        if line is None:
            pending = bytes(buf)
            if b"\n" in pending:
                raise FramingError("chunked body with an LF-only line ending")
            if len(pending) > limit:
                raise FramingError("chunk line too long")
            return None
        line = bytes(line[:-2])
        if len(line) > limit or b"\n" in line or b"\r" in line:
            raise FramingError("malformed chunk line")
        return line

    def _size(self, buf: ReceiveBuffer) -> object:
        line = self._line(buf, MAX_CHUNK_LINE)
        if line is None:
            return None
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise FramingError("malformed chunk size")
        self.remaining = int(match[1], 16)
        self.step = self._data if self.remaining else self._trailer
        return _AGAIN

    def _data(self, buf: ReceiveBuffer) -> object:
        data = buf.maybe_extract_at_most(self.remaining)
        if data is None:
            return None
        self.remaining -= len(data)
        if not self.remaining:
            self.step = self._chunk_end
        return h11.Data(data=bytes(data))

    def _chunk_end(self, buf: ReceiveBuffer) -> object:
        if len(buf) < 2:
            return None
        if buf.maybe_extract_at_most(2) != b"\r\n":
            raise FramingError("chunk data not followed by CRLF")
        self.step = self._size
        return _AGAIN

    def _trailer(self, buf: ReceiveBuffer) -> object:
        line = self._line(buf, self.limits.header_size)
        if line is None:
            return None
        if not line:
            self.step = self._done
            return h11.EndOfMessage()
        self.trailer_size += len(line) + 2
        if self.trailer_size > self.limits.header_size or not _FIELD_LINE.fullmatch(line):
            raise FramingError("malformed or oversized trailer")
        return _AGAIN

    def _done(self, buf: ReceiveBuffer) -> object:
        return None


_AGAIN = object()  # a step consumed framing bytes only: take the next step
