"""Hostile bytes against the outpost, and the apps behind it that show what got through.

A proxy is only as strict as the laxest parser behind it: a bare CR the outpost lets pass is a
header line to Python's `http.server`, a dot segment it does not resolve is a path to the app,
and a forwarded `Upgrade: h2c` is a tunnel past every check. So the tests do not trust the
outpost's answer alone: they ask each app what it parsed. The apps here are real parsers
(`http.server`, `wsgiref`, uvicorn on h11, and an h2c server on the `h2` library), each
recording every request it parsed, in the form its own parser split it.

Requests are written on raw sockets because every HTTP client library refuses to send them.
"""

from __future__ import annotations

import json
import re
import select
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import uvicorn

from mitm_outpost import names
from tests.support.quiet_http import QuietHandler

# Random-looking, so a hit in a log can only come from a request of the tests.
QUERY_MARKER = "qm7Xr2KfV9tLw4Zp"
BODY_MARKER = "bmQ3nH8sYc1JdE6u"

# What every answer of a recording app carries, so a test can tell the outpost's own 400 from an
# app's: uvicorn writes its parse errors itself, without headers of ours, hence the body check.
APP_SERVER = "recording-app"
UVICORN_PARSE_ERROR = b"Invalid HTTP request received."

# The HTTP2-Settings of curl's h2c upgrade: a well-formed value, so only the outpost can stop it.
H2C_SETTINGS = "AAMAAABkAARAAAAAAAIAAAAA"
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# --------------------------------------------------------------------------- the raw client


def request(host: str, target: str = "/", *lines: bytes | str, method: bytes | str = b"GET", body: bytes = b"",
            version: bytes | str = b"HTTP/1.1", close: bool = True) -> bytes:
    """A request from parts, byte for byte: `lines` go out as given (hostile ones included),
    after Host. `close` adds `Connection: close` so the answer ends with the connection."""
    def raw(part: bytes | str) -> bytes:
        return part if isinstance(part, bytes) else part.encode("latin-1")

    head = [raw(method) + b" " + raw(target) + b" " + raw(version), b"Host: " + raw(host), *map(raw, lines)]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def exchange(port: int, raw: bytes, *, deadline: float = 5.0, shutdown_write: bool = False) -> tuple[bytes, float]:
    """Send `raw` on a new connection; read until the server closes, the first response is
    complete, or `deadline` passes. Returns the bytes read and the seconds taken.

    The bytes go out from a thread, in slices, and stop once an answer arrives: a server may
    answer before it reads a large body (that is the point of some tests), and a client that
    kept writing would get a reset that can destroy the answer it has not read yet."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    answered = threading.Event()
    sender = threading.Thread(target=_send, args=(sock, raw, answered, shutdown_write), daemon=True)
    sender.start()
    received = bytearray()
    try:
        while not response_complete(received):
            remaining = deadline - (time.monotonic() - started)
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            received += chunk
            answered.set()
    finally:
        elapsed = time.monotonic() - started
        answered.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked in send()
        except OSError:
            pass
        sock.close()
        sender.join(2)
    return bytes(received), elapsed


def _send(sock: socket.socket, raw: bytes, answered: threading.Event, shutdown_write: bool) -> None:
    view = memoryview(raw)
    try:
        for offset in range(0, len(raw), 1 << 16):
            if answered.is_set():
                return
            sock.sendall(view[offset:offset + (1 << 16)])
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server closed on us: what the reader saw is the answer


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names; the last value of a repeated name
    body: bytes


def first_response(data: bytes) -> Response | None:
    """The first response in `data` (its body as far as it was read), or None if there is no
    complete status line and header block."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/\d\.\d (\d{3})", status_line)
    if not match:
        return None
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = headers.get("content-length", "")
    return Response(int(match[1]), headers, rest[:int(length)] if length.isdigit() else rest)


def status_of(data: bytes) -> int:
    """The status of the first response, 0 if there is none (nothing, or not HTTP)."""
    response = first_response(data)
    return response.status if response else 0


def response_complete(data: bytes) -> bool:
    """Whether the first response has been read whole, so the client need not wait for a close
    that a keep-alive server never sends. An interim (1xx) response counts: the tests that
    send `Expect` or `Upgrade` must see it, not wait past it."""
    response = first_response(data)
    if response is None:
        return False
    if response.status < 200 or response.status in (204, 304):
        return True
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        return response.body.endswith(b"0\r\n\r\n")
    length = response.headers.get("content-length", "")
    return length.isdigit() and len(response.body) >= int(length)


def answered_by_app(response: Response) -> bool:
    """An answer written by a recording app (or its framework), not by the outpost."""
    return response.headers.get("server", "").startswith(APP_SERVER) or response.body.startswith(UVICORN_PARSE_ERROR)


# --------------------------------------------------------------------------- what an app parsed


def _key(name: str) -> str:
    """Frameworks fold `_` into `-` and ignore case (WSGI, CGI): a forged `X_authentik_groups` is
    the same header to them, so the tests look names up the same way."""
    return name.lower().replace("_", "-")


@dataclass(frozen=True)
class Seen:
    """One request as an app's parser handed it to the app."""

    app: str
    protocol: str  # "http/1.1", "h2" (a stream after an h2c upgrade or preface), "websocket"
    method: str
    target: str  # the request-target before any decoding (RAW_URI, raw_path, :path)
    path: str  # the path the app's framework decoded from it (PATH_INFO, scope["path"])
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    trailers: tuple[tuple[str, str], ...] = ()

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if _key(key) == _key(name)]


class Recorder:
    """An app on a free loopback port, with the list of the requests it parsed."""

    name = "app"

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, seen: Seen) -> None:
        self.seen.append(seen)  # list.append is atomic: the apps' threads need no lock

    def echo(self, seen: Seen) -> bytes:
        """The 200 body every app answers: enough for a test to read what the app parsed."""
        self.record(seen)
        return json.dumps({"app": self.name, "method": seen.method, "target": seen.target,
                           "headers": seen.headers, "body_length": len(seen.body)}).encode()

    def stop(self) -> None:
        raise NotImplementedError


def _serve_in_thread(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return thread


# (a) http.server: the email-package header parser, which takes a bare CR for a line end.


class HttpServerApp(Recorder):
    name = "http.server"

    def __init__(self) -> None:
        super().__init__()
        app = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a request smuggled behind another is parsed too
            server_version = f"{APP_SERVER}/{app.name}"

            def __getattr__(self, name: str) -> Callable[[], None]:
                if name.startswith("do_"):  # every method reaches the app, as in most frameworks
                    return self.answer
                raise AttributeError(name)

            def answer(self) -> None:
                body, trailers = _read_body(self.rfile, self.headers.get("Content-Length"),
                                            self.headers.get("Transfer-Encoding", ""))
                path = urllib.parse.unquote(self.path.partition("?")[0])
                headers = tuple(self.headers.items())
                seen = Seen(app.name, "http/1.1", self.command, self.path, path, headers, body, trailers)
                self.reply(200, app.echo(seen))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = _serve_in_thread(self.server)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_body(rfile: Any, length: str | None, transfer_encoding: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The body as a plain app reads it: chunked (with its trailer fields kept apart from the
    headers), else Content-Length. A framing the app cannot read ends the body there."""
    if "chunked" not in transfer_encoding.lower():
        return (rfile.read(int(length)) if length and length.isdigit() else b""), ()
    body, trailers = bytearray(), []
    try:
        while size := int(rfile.readline(1024).split(b";")[0].strip(), 16):
            body += rfile.read(size)
            rfile.readline(1024)
        while (line := rfile.readline(8192).strip()) and len(trailers) < 100:
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name.strip(), value.strip()))
    except ValueError:
        pass
    return bytes(body), tuple(trailers)


# (b) wsgiref: what a WSGI app sees, HTTP_* keys where `-` and `_` are the same character.


class WsgiApp(Recorder):
    name = "wsgiref"

    def __init__(self) -> None:
        super().__init__()

        class Handler(WSGIRequestHandler):
            server_version = f"{APP_SERVER}/{self.name}"

            def get_environ(self) -> dict[str, Any]:
                environ = super().get_environ()
                environ["RAW_URI"] = self.path  # as gunicorn sets it: wsgiref only has the decoded PATH_INFO
                return environ

            def log_message(self, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.set_app(self.app)
        self.port = self.server.server_address[1]
        self.thread = _serve_in_thread(self.server)

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        body = environ["wsgi.input"].read(int(length)) if length.isdigit() else b""
        headers = tuple((key[5:], value) for key, value in environ.items() if key.startswith("HTTP_"))
        seen = Seen(self.name, "http/1.1", environ["REQUEST_METHOD"], environ["RAW_URI"], environ["PATH_INFO"], headers,
                    body)
        reply = self.echo(seen)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(reply))),
                                  ("Server", f"{APP_SERVER}/{self.name}")])
        return [reply]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# (c) uvicorn on h11: a strict parser, and the ASGI app that also takes WebSockets.


class UvicornApp(Recorder):
    name = "uvicorn-h11"

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, interface="asgi3", http="h11", ws="websockets-sansio", lifespan="off",
                                log_level="critical", proxy_headers=False, access_log=False, server_header=False,
                                headers=[("server", f"{APP_SERVER}/{self.name}")])
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(100):
            if self.server.started:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("uvicorn did not start")

    def _seen(self, scope: dict[str, Any], protocol: str, body: bytes = b"") -> Seen:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"])
        return Seen(self.name, protocol, scope.get("method", "GET"), target, scope["path"], headers, body)

    async def app(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reply = self.echo(self._seen(scope, "http/1.1", body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": reply})

    async def websocket(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        """The one protocol switch an app behind the outpost may get: echoes `<user>:<message>`."""
        seen = self._seen(scope, "websocket")
        self.record(seen)
        user = (seen.values(names.USERNAME) or [""])[0]
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"{user}:{message.get('text')}"})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


# (d) an h2c server: any Upgrade naming h2c gets a 101, then HTTP/2 on the same connection.


class H2cApp(Recorder):
    """Written on `h2` because no server installed here does h2c upgrades. Its HTTP/1 parser is
    deliberately lax (a CR, LF or CRLF ends a line; a folded line is a header of its own), the
    way a hand-written or embedded server is, so whatever the outpost lets through shows."""

    name = "h2c"

    def __init__(self) -> None:
        super().__init__()
        app = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                try:
                    app.serve(self.request)
                except (OSError, ValueError, h2.exceptions.H2Error):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = _serve_in_thread(self.server)

    def serve(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            while not (end := re.search(rb"\r?\n\r?\n", buffer)):
                if not (chunk := sock.recv(1 << 16)):
                    return
                buffer += chunk
            if buffer.startswith(_H2_PREFACE[:end.end()]):  # prior knowledge: h2 from the first byte
                self.serve_h2(sock, buffer, None)
                return
            head, buffer = buffer[:end.start()], buffer[end.end():]
            seen, buffer = self.parse(sock, head, buffer)
            upgrade = ",".join(seen.values("Upgrade")).lower()
            if "h2c" in [token.strip() for token in upgrade.split(",")]:
                reply = self.echo(seen)
                # Stream 1 is the request that asked for the upgrade (RFC 7540 §3.2); recorded before
                # the 101 goes out, so a client that has read the 101 finds it recorded.
                self.record(Seen(**{**seen.__dict__, "protocol": "h2"}))
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                self.serve_h2(sock, buffer, ((seen.values("HTTP2-Settings") or [""])[0], reply))
                return
            reply = self.echo(seen)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: {APP_SERVER}/{self.name}\r\n"
            sock.sendall(f"{head}Content-Length: {len(reply)}\r\n\r\n".encode() + reply)

    def parse(self, sock: socket.socket, head: bytes, buffer: bytes) -> tuple[Seen, bytes]:
        lines = re.split(rb"\r\n|\r|\n", head.lstrip(b"\r\n"))
        method, target, *_ = lines[0].decode("latin-1").split(" ") + ["", ""]
        headers = []
        for line in lines[1:]:
            name, colon, value = line.strip().decode("latin-1").partition(":")
            if colon:
                headers.append((name.strip(), value.strip()))
        path = urllib.parse.unquote(target.partition("?")[0])
        seen = Seen(self.name, "http/1.1", method, target, path, tuple(headers))
        length = next((v for k, v in headers if k.lower() == "content-length"), "")
        chunked = any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
        body = b""
        if chunked:
            body, buffer = self.read_chunked(sock, buffer)
        elif length.isdigit():
            while len(buffer) < int(length) and (chunk := sock.recv(1 << 16)):
                buffer += chunk
            body, buffer = buffer[:int(length)], buffer[int(length):]
        return Seen(**{**seen.__dict__, "body": body}), buffer

    @staticmethod
    def read_chunked(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
        body = b""
        while True:
            while not (line := re.match(rb"([^\r\n]*)\r?\n", buffer)):
                if not (chunk := sock.recv(1 << 16)):
                    return body, b""
                buffer += chunk
            size = int(line[1].split(b";")[0].strip() or b"0", 16)  # ValueError: the handler gives up
            buffer = buffer[line.end():]
            if size == 0:
                end = re.search(rb"\r?\n\r?\n|^\r?\n", buffer)
                return body, buffer[end.end():] if end else b""
            while len(buffer) < size + 1 and (chunk := sock.recv(1 << 16)):
                buffer += chunk
            body, buffer = body + buffer[:size], re.sub(rb"^\r?\n", b"", buffer[size:])

    def serve_h2(self, sock: socket.socket, pending: bytes, upgraded: tuple[str, bytes] | None) -> None:
        """HTTP/2 until the peer leaves, recording every stream's request headers. `upgraded`:
        the client's HTTP2-Settings and the answer owed on stream 1, after an h2c upgrade."""
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        replies: dict[int, bytes] = {}
        if upgraded is not None:
            settings = upgraded[0].encode()
            conn.initiate_upgrade_connection(settings + b"=" * (-len(settings) % 4) if settings else None)
            self._reply_h2(conn, 1, upgraded[1])
        else:
            conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        while True:
            for event in conn.receive_data(pending) if pending else ():
                if isinstance(event, h2.events.RequestReceived):
                    headers = tuple((str(k), str(v)) for k, v in event.headers)
                    found = dict(headers)
                    seen = Seen(self.name, "h2", found.get(":method", ""), found.get(":path", ""),
                                urllib.parse.unquote(found.get(":path", "").partition("?")[0]), headers)
                    replies[event.stream_id] = self.echo(seen)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in replies:
                    self._reply_h2(conn, event.stream_id, replies.pop(event.stream_id))
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            sock.sendall(conn.data_to_send())
            if not (pending := sock.recv(1 << 16)):
                return

    def _reply_h2(self, conn: h2.connection.H2Connection, stream_id: int, reply: bytes) -> None:
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json"),
                                      ("server", f"{APP_SERVER}/{self.name}"), ("content-length", str(len(reply)))])
        conn.send_data(stream_id, reply, end_stream=True)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- upstreams that fail


class SilentApp(Recorder):
    """Accepts connections and never answers: the outpost's upstream timeout is all that ends a
    request sent there."""

    name = "silent"

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class UnacceptingListener(Recorder):
    """A port whose accept queue is full, so the kernel drops new SYNs: a connect there hangs,
    as towards a host that is gone, until the outpost's connect timeout ends it."""

    name = "unaccepting"

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(8):  # the queue holds backlog+1 connections; fill it until a connect hangs
            filler = socket.socket()
            filler.setblocking(False)
            self.fillers.append(filler)
            if filler.connect_ex(("127.0.0.1", self.port)) != 0 and not _connects_within(filler, 0.2):
                break

    def stop(self) -> None:
        for sock in (*self.fillers, self.sock):
            sock.close()


def _connects_within(sock: socket.socket, seconds: float) -> bool:
    _, writable, _ = select.select([], [sock], [], seconds)
    return bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
