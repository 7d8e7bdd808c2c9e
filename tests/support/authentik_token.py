"""A stand-in for authentik's token endpoint, for the one grant no certified IdP here speaks.

authentik's header Basic auth (spec §11) sends `grant_type=client_credentials` with the
provider's client_id and a user's name and app password, and no client secret; authentik
answers with an HS256 ID token signed with the client secret. Only that contract is served:
discovery and the token endpoint (a provider with no signing key: HS256 only, its JWKS URL still advertised).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from http.server import ThreadingHTTPServer

import jwt

from mitm_outpost.testing.processes import free_port
from tests.support.quiet_http import InThread, QuietHandler


class AuthentikTokenEndpoint(InThread):
    def __init__(self, client_id: str, client_secret: str, app_passwords: dict[str, str]) -> None:
        self.client_id, self.client_secret, self.app_passwords = client_id, client_secret, app_passwords
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/application/o/app/"
        endpoint = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if not self.path.startswith("/application/o/app/.well-known/openid-configuration"):
                    return self._json(404, {})
                base = f"http://127.0.0.1:{endpoint.port}/application/o"
                self._json(200, {"issuer": endpoint.issuer, "authorization_endpoint": f"{base}/authorize/",
                                 "token_endpoint": f"{base}/token/", "id_token_signing_alg_values_supported": ["HS256"],
                                 # authentik advertises the application's JWKS URL even with no signing key
                                 "jwks_uri": f"{base}/app/jwks/",
                                 "token_endpoint_auth_methods_supported": ["client_secret_post"]})

            def do_POST(self) -> None:
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                user = form.get("username", "")
                if (form.get("grant_type") != "client_credentials" or form.get("client_id") != endpoint.client_id
                        or endpoint.app_passwords.get(user) != form.get("password") or "client_secret" in form):
                    return self._json(400, {"error": "invalid_grant"})
                now = int(time.time())
                claims = {"iss": endpoint.issuer, "aud": endpoint.client_id, "sub": f"hashed-{user}", "iat": now,
                          "exp": now + 300, "preferred_username": user, "email": f"{user}@example.test",
                          "groups": ["api"]}
                token = jwt.encode(claims, endpoint.client_secret, algorithm="HS256")
                self._json(200, {"access_token": token, "id_token": token, "token_type": "Bearer", "expires_in": 300})

            def _json(self, status: int, body: dict[str, object]) -> None:
                self.reply(status, json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
