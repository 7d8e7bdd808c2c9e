"""The demo upstream app: a page that shows the identity headers it received.

It has no login of its own, like every app an outpost protects. `GET /` renders a "who am I"
page; `GET /headers` returns all request headers as JSON (tests read this); `POST /upload`
counts the body it received and `GET /download/<n>` sends n bytes (streaming checks).
"""

import html
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0] + "/addons")
from mitm_outpost import names  # noqa: E402

SHOWN = (*names.ALL_IDENTITY_HEADERS, "Host", names.FORWARDED_HOST, names.FORWARDED_PROTO, names.FORWARDED_FOR,
         "Cookie")


class WhoAmI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        remaining, received = int(self.headers.get("Content-Length") or 0), 0
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            received += len(chunk)
            remaining -= len(chunk)
        self._send(200, "application/json", json.dumps({"received": received}).encode())

    def do_GET(self) -> None:
        if self.path.startswith("/download/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * (1 << 20)
            for offset in range(0, size, len(block)):
                self.wfile.write(block[: size - offset])
            return
        if self.path.startswith("/headers"):
            body = json.dumps({"path": self.path, "port": self.server.server_address[1],
                               "headers": [[k, v] for k, v in self.headers.items()]}).encode()
            self._send(200, "application/json", body)
            return
        user = self.headers.get(names.USERNAME)
        rows = "".join(
            f"<tr><th>{html.escape(n)}</th><td><code>{html.escape(self.headers.get(n, '—'))[:120]}</code></td></tr>"
            for n in SHOWN
        )
        title = f"Hello, {html.escape(user)}" if user else "Nobody is signed in"
        body = (f"""<!doctype html><html><head><meta charset="utf-8"><title>who am I</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}th{{text-align:left;padding-right:1rem}}"""
                f"""td code{{word-break:break-all}}</style>
</head><body><h1>{title}</h1><p>This page is the demo app behind mitm-outpost. It shows the headers it received.</p>
<table>{rows}</table><p><a href="{names.SIGN_OUT_PATH}">Sign out</a></p></body></html>""").encode()
        self._send(200, "text/html; charset=utf-8", body)


    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9080
    ThreadingHTTPServer(("127.0.0.1", port), WhoAmI).serve_forever()
