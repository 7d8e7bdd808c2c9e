"""The edge's grammar: request heads and chunked bodies, byte for byte."""

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.test import tutils

from mitm_outpost.edge_rules import (
    FramingError,
    Limits,
    StrictChunkedReader,
    fields_violation,
    framing_violation,
    head_violation,
    incomplete_head_violation,
)

LIMITS = Limits(request_line=64, header_size=256, header_count=4)
OK = b"GET /a?b=c HTTP/1.1\r\nHost: app\r\nX-Tab: a\tb\r\nX-Latin: caf\xe9\r\n\r\n"


@pytest.mark.parametrize("head, code", [
    (OK, None),
    (b"GET / HTTP/1.0\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nX-Note: a\rX-authentik-groups: admins\r\n\r\n", "field_value_control_character"),
    (b"GET / HTTP/1.1\r\nX-Note: a\x00b\r\n\r\n", "field_value_control_character"),
    (b"GET / HTTP/1.1\r\nX-Note: a\x01b\r\n\r\n", "field_value_control_character"),
    (b"GET / HTTP/1.1\r\nX-Note: a\x7fb\r\n\r\n", "field_value_control_character"),
    (b"GET / HTTP/1.1\r\nX-Note: a\nX-authentik-username: x\r\n\r\n", "bare_lf"),
    (b"GET / HTTP/1.1\r\nX-A: a\r\n X-authentik-username: admin\r\n\r\n", "obs_fold"),
    (b"GET / HTTP/1.1\r\nX-A: a\r\n\tcontinued\r\n\r\n", "obs_fold"),
    (b"GET / HTTP/1.1\r\nX A: a\r\n\r\n", "field_name"),
    (b"GET / HTTP/1.1\r\nX-A : a\r\n\r\n", "field_name"),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", "field_name"),
    (b"G\x00T / HTTP/1.1\r\n\r\n", "method"),
    (b"GE(T / HTTP/1.1\r\n\r\n", "method"),
    (b"GET / HTTP/9.9\r\n\r\n", "version"),
    (b"GET / HTTP/1.2\r\n\r\n", "version"),
    (b"GET / http/1.1\r\n\r\n", "version"),
    (b"GET /a b HTTP/1.1\r\n\r\n", "request_target"),
    (b"GET http://evil.test/ HTTP/1.1\r\n\r\n", "request_target"),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", "request_target"),
    (b"GET /caf\xe9 HTTP/1.1\r\n\r\n", "request_target"),
    (b"GET /" + b"a" * 64 + b" HTTP/1.1\r\n\r\n", "request_line_too_long"),
    (b"GET / HTTP/1.1\r\n" + b"X-A: a\r\n" * 5 + b"\r\n", "too_many_header_fields"),
    (b"GET / HTTP/1.1\r\nX-A: " + b"a" * 250 + b"\r\n\r\n", "header_too_large"),
])
def test_request_heads(head: bytes, code: str | None) -> None:
    refusal = head_violation(head, LIMITS)
    assert (refusal.code if refusal else None) == code
    if refusal:
        assert refusal.status == {"request_line_too_long": 414, "too_many_header_fields": 431,
                                  "header_too_large": 431}.get(code, 400)


@pytest.mark.parametrize("pending, code", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
    (b"GET /" + b"a" * 80, "request_line_too_long"),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 300, "header_too_large"),
    (b"GET / HTTP/1.1\nHost: a\n", "bare_lf"),
])
def test_heads_still_arriving_are_refused_as_soon_as_they_cannot_pass(pending: bytes, code: str | None) -> None:
    refusal = incomplete_head_violation(pending, LIMITS)
    assert (refusal.code if refusal else None) == code


def _request(*fields: tuple[str, str], version: str = "HTTP/1.1"):  # type: ignore[no-untyped-def]
    request = tutils.treq(headers=(), http_version=version.encode())
    for name, value in fields:
        request.headers.add(name, value)
    return request


@pytest.mark.parametrize("fields, version, code", [
    ((("Host", "a"),), "HTTP/1.1", None),
    ((), "HTTP/1.0", None),
    ((), "HTTP/1.1", "missing_host"),
    ((("Host", "a"), ("Host", "b")), "HTTP/1.1", "multiple_host"),
    ((("Host", "a"), ("Transfer-Encoding", "chunked"), ("Content-Length", "5")), "HTTP/1.1",
     "content_length_with_transfer_encoding"),
    ((("Host", "a"), ("Transfer-Encoding", "gzip, chunked")), "HTTP/1.1", "transfer_encoding"),
    ((("Host", "a"), ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")), "HTTP/1.1",
     "transfer_encoding"),
    ((("Host", "a"), ("Content-Length", "5"), ("Content-Length", "5")), "HTTP/1.1", "content_length"),
    ((("Host", "a"), ("Content-Length", "-1")), "HTTP/1.1", "content_length"),
    ((("Host", "a"), ("Content-Length", "03")), "HTTP/1.1", "content_length"),  # a leading zero: parsers differ
])
def test_framing(fields: tuple, version: str, code: str | None) -> None:
    assert framing_violation(_request(*fields, version=version)) == code


def test_requests_not_read_as_http1_bytes_follow_the_same_value_rules() -> None:
    h2 = _request(("x-note", "fine"), version="HTTP/2.0")
    assert fields_violation(h2) is None
    h2.headers.add("x-note", "a\rb")
    assert fields_violation(h2) == "field_value_control_character"
    assert fields_violation(_request(version="HTTP/3.1")) == "version"


def _read(body: bytes) -> tuple[bytes, list[object]]:
    reader = StrictChunkedReader(LIMITS)
    buf = ReceiveBuffer()
    buf += body
    data, events = b"", []
    while (event := reader(buf)) is not None:
        events.append(event)
        if isinstance(event, h11.Data):
            data += event.data
        if isinstance(event, h11.EndOfMessage):
            break
    return data, events


def test_chunked_body_with_extensions_and_a_trailer_that_is_dropped() -> None:
    data, events = _read(b"5;name=v\r\nhello\r\n000006\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
    assert data == b"hello world"
    assert isinstance(events[-1], h11.EndOfMessage) and events[-1].headers == []  # type: ignore[attr-defined]


def test_chunked_body_arriving_byte_by_byte() -> None:
    reader, buf, data = StrictChunkedReader(LIMITS), ReceiveBuffer(), b""
    for byte in b"3\r\nabc\r\n0\r\n\r\n":
        buf += bytes([byte])
        while (event := reader(buf)) is not None:
            if isinstance(event, h11.EndOfMessage):
                assert data == b"abc"
                return
            data += event.data  # type: ignore[attr-defined]
    raise AssertionError("no end of message")


@pytest.mark.parametrize("body", [
    b"5\nhello\n0\n\n",  # LF-only lines
    b"5\r\nhello\n0\r\n\r\n",  # LF after the data
    b"zz\r\nhello\r\n",  # not hex
    b"ffffffffffffffffffff\r\n",  # a size no request needs
    b"-5\r\nhello\r\n",
    b"5 \x00\r\nhello\r\n",
    b"5\r\nhelloXY0\r\n\r\n",  # data longer than its size
    b"0\r\nX-T: a\rb\r\n\r\n",  # a bare CR in a trailer
    b"0\r\n X-folded: 1\r\n\r\n",
    b"5" + b"0" * 2000,  # a size line that never ends
])
def test_bad_chunked_framing_is_an_error_never_a_wait(body: bytes) -> None:
    with pytest.raises(FramingError):
        _read(body)


def test_a_body_cut_short_is_an_error() -> None:
    with pytest.raises(FramingError):
        StrictChunkedReader(LIMITS).read_eof()
