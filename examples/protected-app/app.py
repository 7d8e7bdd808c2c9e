"""A tiny app protected by mitm-outpost: it has no login of its own and trusts the identity headers.

- ``GET /``        a page greeting the user; members of the group ``admins`` also see the admin panel
- ``GET /admin``   the admin panel itself: 403 for everyone not in ``admins``
- ``GET /whoami``  the request headers the app received, as JSON ``{"headers": {...}}`` (what the tests assert on)
- ``GET /health``  ``ok``, meant to be reachable without a login (``skip_path_regex``)

Run: ``python app.py --port 8080`` (standard library only).
"""

from __future__ import annotations

import argparse
import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def groups(headers) -> set[str]:
    """The outpost sends the user's groups joined with ``|``; an empty value means none."""
    return {g for g in (headers.get("X-authentik-groups") or "").split("|") if g}


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        user = self.headers.get("X-authentik-username") or ""
        is_admin = "admins" in groups(self.headers)
        if path == "/health":
            self.reply(200, "text/plain", "ok")
        elif path == "/whoami":
            self.reply(200, "application/json", json.dumps({"headers": dict(self.headers.items())}))
        elif path == "/admin":
            if is_admin:
                self.reply(200, "text/html", "<h1>Admin panel</h1><p>Only admins get here.</p>")
            else:
                self.reply(403, "text/html", "<h1>Forbidden</h1>")
        elif path == "/":
            panel = ('<section id="admin-panel"><h2>Admin panel</h2><a href="/admin">manage</a></section>'
                     if is_admin else "")
            self.reply(200, "text/html", f"<h1>Hello, {html.escape(user) or 'stranger'}</h1>{panel}")
        else:
            self.reply(404, "text/plain", "not found")

    def reply(self, status: int, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    ThreadingHTTPServer(("127.0.0.1", parser.parse_args().port), App).serve_forever()
