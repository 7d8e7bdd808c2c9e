"""A contract double of the authentik server API that a proxy outpost talks to (spec §2.2, §2.3, §12).

One loopback port serves both halves, as authentik does on one host:

* the REST calls of §2.2 (`/api/v3/outposts/instances/`, `/api/v3/root/config/`,
  `/api/v3/outposts/proxy/`, `/api/v3/crypto/certificatekeypairs/<uuid>/[view_certificate/|view_private_key/]`),
  over HTTP/1.1 with keep-alive (`http.server`);
* the outpost websocket `ws/outpost/<pk>/` (§2.3), upgraded on the same port; the frames are handled by
  the `websockets` package's sans-I/O protocol.

Every JSON body the double sends is first validated against the component schemas extracted from
authentik's published OpenAPI document (`tests/fixtures/authentik-openapi-components.json`), in a
*strict* form: every declared property must be present (a DRF serializer always writes all its fields)
and, except where authentik really sends more (the OIDC discovery document), no undeclared property
may appear. Data handed in by a test (`set_providers`, `set_outpost`, `add_certificate`) is validated
at once, in the test's thread; a body that fails when served is answered with a 500, recorded in
`violations`, and raised again by `check()` and when the `with` block ends. So the double cannot
drift from the real shapes without a test failing.

Behaviour copied from authentik 2025.x (see the fixture's `x-source`):
* auth is DRF's: a wrong `Bearer` token is 403 `{"detail": "Token invalid/expired"}`, no header is 403
  `{"detail": "Authentication credentials were not provided."}`, another scheme is 403
  `{"detail": "Unsupported authentication type"}`. `/api/v3/root/config/` alone also answers without a
  header (its OpenAPI security allows anonymous), but still refuses a wrong token.
* pagination is `authentik.api.pagination.Pagination` over Django's paginator: `next`/`previous` are
  0 when absent, `page` that is not an integer, < 1 or past the last page is 404 `{"detail": "Invalid
  page."}`, `page=last` is the last page, a `page_size` that is not a positive integer falls back to
  the default, an empty list is one page with start_index = end_index = 0. The default page size
  (100) and cap (none) are constructor arguments: newer authentik reads both from its `pagination`
  settings, whose shipped values were not checked here; the outpost always asks for page_size=100.
* JSON Schema `format` is checked where jsonschema can without extra packages: `uuid` is, `uri` and
  `date-time` are not.
* provider configs are listed ordered by name (`ProxyOutpostConfigViewSet.ordering`).
* the websocket denies a missing or wrong token, or another outpost's pk, with HTTP 403 at the
  handshake; it answers every message except an ACK with `{"instruction": 0, "args": {}}`.

It also stands in for the rest of the authentik server, as the backend behind an embedded outpost
(seed 003), on the same port and without authentication (as authentik's own pages and files):
`/static/...`, `/media/...` and `/help/` files (`BACKEND_FILES`), the flow interface
`/if/flow/<slug>/` and the health checks `/-/health/live/` and `/-/health/ready/`, an echo websocket
`/ws/client/` (authentik's UI websocket; frames in `echo_clients`), a slow endpoint `/slow/?seconds=S`
(`&chunks=N`: N chunks S seconds apart), and an upload endpoint `POST|PUT /upload/` that counts the
body bytes it read, with a Content-Length or chunked (`uploads`). Every request is in `requests`
with its headers exactly as received (`raw_headers`: names as sent, in order, repeats kept).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import secrets
import socket
import string
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import packaging.version
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from mitm_outpost import names

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "authentik-openapi-components.json"

# Websocket instructions (authentik/outposts/consumer.py: WebsocketMessageInstruction).
ACK, HELLO, TRIGGER_UPDATE, PROVIDER_SPECIFIC, SESSION_END = 0, 1, 2, 3, 4

DEFAULT_SCOPES = ["openid", "profile", "email", "entitlements", "ak_proxy"]
# Schemas whose objects authentik fills with more keys than the OpenAPI document declares.
OPEN_SCHEMAS = frozenset({"OpenIDConnectConfiguration", "Autocomplete"})
# Schemas whose declared keys are not all always written (DRF's error body has `detail` but no `code`).
PARTIAL_SCHEMAS = frozenset({"GenericError"})


class ContractViolation(AssertionError):
    """A body the double was about to serve, or was given, does not match authentik's schema."""


# ---------------------------------------------------------------------------------------------
# Schemas


@cache
def load_components() -> dict[str, Any]:
    """The fixture as stored: `{"x-source": ..., "components": {"schemas": {...}}}`."""
    return json.loads(FIXTURE.read_text())


@cache
def _strict_document() -> dict[str, Any]:
    doc = copy.deepcopy(load_components())
    for name, schema in doc["components"]["schemas"].items():
        if "properties" in schema:
            if name not in PARTIAL_SCHEMAS:
                schema["required"] = list(schema["properties"])
            if name not in OPEN_SCHEMAS:
                schema["additionalProperties"] = False
    return doc


@cache
def _validator(name: str, strict: bool) -> jsonschema.Draft202012Validator:
    doc = _strict_document() if strict else load_components()
    if name not in doc["components"]["schemas"]:
        raise KeyError(f"no schema {name!r} in {FIXTURE.name}")
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate(schema_name: str, instance: Any, *, strict: bool = True) -> None:
    """Raise ContractViolation unless `instance` matches authentik's `schema_name`.

    strict=False checks the OpenAPI schema exactly as published (only its `required` lists);
    strict=True (the double's own check) also wants every declared property and no unknown one."""
    errors = sorted(_validator(schema_name, strict).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]]
        raise ContractViolation(f"body does not match authentik's {schema_name}:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Builders of authentik-shaped objects

_pks = itertools.count(1)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "app"


def random_cookie_secret() -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


def hash_session_key(session_key: str) -> str:
    """authentik's `hash_session_key`: the `sid` claim and the SESSION_END `session_id` (§12)."""
    return hashlib.sha256(session_key.encode("ascii")).hexdigest()


def authentik_oidc_configuration(authentik_url: str, application_slug: str, *, alg: str = "HS256",
                                 scopes: Iterable[str] = DEFAULT_SCOPES) -> dict[str, Any]:
    """The discovery document authentik embeds as `oidc_configuration` (`ProviderInfoView.get_info`).

    It is the full document, more keys than the OpenAPI `OpenIDConnectConfiguration` declares. A proxy
    provider has no signing key, so its one algorithm is HS256 (§2.4)."""
    base = authentik_url.rstrip("/") + "/application/o/"
    return {
        "issuer": f"{base}{application_slug}/",
        "authorization_endpoint": f"{base}authorize/",
        "token_endpoint": f"{base}token/",
        "userinfo_endpoint": f"{base}userinfo/",
        "end_session_endpoint": f"{base}{application_slug}/end-session/",
        "introspection_endpoint": f"{base}introspect/",
        "revocation_endpoint": f"{base}revoke/",
        "device_authorization_endpoint": f"{base}device/",
        "response_types_supported": ["code", "id_token", "id_token token", "code token", "code id_token",
                                     "code id_token token"],
        "response_modes_supported": ["query", "fragment", "form_post"],
        "jwks_uri": f"{base}{application_slug}/jwks/",
        "grant_types_supported": ["authorization_code", "refresh_token", "implicit", "client_credentials",
                                  "password", "urn:ietf:params:oauth:grant-type:device_code"],
        "id_token_signing_alg_values_supported": [alg],
        "subject_types_supported": ["public"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "acr_values_supported": ["goauthentik.io/providers/oauth2/default"],
        "scopes_supported": list(scopes),
        "request_parameter_supported": False,
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "amr", "nonce"],
        "claims_parameter_supported": False,
        "code_challenge_methods_supported": ["plain", "S256"],
    }


def make_provider(name: str, external_host: str, internal_host: str = "", mode: str = names.Mode.PROXY.value,
                  client_id: str | None = None, client_secret: str | None = None,
                  oidc_configuration: dict[str, Any] | str | None = None, **overrides: Any) -> dict[str, Any]:
    """One `ProxyOutpostConfig`, every field present, as `/api/v3/outposts/proxy/` lists it (§2.4).

    `oidc_configuration` is the discovery document (a dict, e.g. a test IdP's), or an authentik base URL
    to build authentik's own document from, or None for one under http://authentik.test/. `overrides`
    set any other field (pk, certificate, skip_path_regex, cookie_domain, access_token_validity,
    scopes_to_request, assigned_application_slug, ...); an unknown field fails validation."""
    slug = overrides.get("assigned_application_slug") or slugify(name)
    if oidc_configuration is None or isinstance(oidc_configuration, str):
        oidc_configuration = authentik_oidc_configuration(oidc_configuration or "http://authentik.test/", slug)
    provider: dict[str, Any] = {
        "pk": next(_pks),
        "name": name,
        "internal_host": internal_host,
        "external_host": external_host,
        "internal_host_ssl_validation": True,
        "client_id": client_id if client_id is not None else secrets.token_hex(20),
        "client_secret": client_secret if client_secret is not None else secrets.token_urlsafe(96)[:128],
        "oidc_configuration": oidc_configuration,
        "cookie_secret": random_cookie_secret(),
        "certificate": None,
        "skip_path_regex": "",
        "basic_auth_enabled": False,
        "basic_auth_password_attribute": "",
        "basic_auth_user_attribute": "",
        "mode": mode,
        "cookie_domain": "",
        "access_token_validity": 86400.0,  # the admin UI's default (hours=24); the model's is hours=1
        "intercept_header_auth": True,
        "scopes_to_request": list(DEFAULT_SCOPES),
        "assigned_application_slug": slug,
        "assigned_application_name": name,
    }
    provider.update(overrides)
    validate("ProxyOutpostConfig", provider)
    return provider


def provider_obj(provider: dict[str, Any]) -> dict[str, Any]:
    """The `Provider` summary the Outpost object lists in `providers_obj` for a proxy provider."""
    seed = str(provider["pk"])
    return {
        "pk": provider["pk"],
        "name": provider["name"],
        "authentication_flow": None,
        "authorization_flow": str(uuid.uuid5(uuid.NAMESPACE_URL, "authorization-flow")),
        "invalidation_flow": str(uuid.uuid5(uuid.NAMESPACE_URL, "invalidation-flow")),
        "property_mappings": [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{scope}"))
                              for scope in provider["scopes_to_request"]],
        "component": "ak-provider-proxy-form",
        "assigned_application_slug": provider["assigned_application_slug"],
        "assigned_application_name": provider["assigned_application_name"],
        "assigned_backchannel_application_slug": None,
        "assigned_backchannel_application_name": None,
        "verbose_name": "Proxy Provider",
        "verbose_name_plural": "Proxy Providers",
        "meta_model_name": "authentik_providers_proxy.proxyprovider",
    }


def outpost_default_config(authentik_host: str, refresh_interval: str = "minutes=5") -> dict[str, Any]:
    """authentik's default `OutpostConfig` (authentik/outposts/models.py) for a new outpost."""
    return {
        "log_level": "info",
        "docker_labels": None,
        "authentik_host": authentik_host,
        "docker_network": None,
        "container_image": None,
        "docker_map_ports": True,
        "refresh_interval": refresh_interval,
        "kubernetes_replicas": 1,
        "kubernetes_namespace": "authentik",
        "authentik_host_browser": "",
        "object_naming_template": "ak-outpost-%(name)s",
        "authentik_host_insecure": False,
        "kubernetes_json_patches": None,
        "kubernetes_service_type": "ClusterIP",
        "kubernetes_image_pull_secrets": [],
        "kubernetes_ingress_class_name": None,
        "kubernetes_disabled_components": [],
        "kubernetes_ingress_annotations": {},
        "kubernetes_ingress_secret_name": "authentik-outpost-tls",
        "kubernetes_httproute_annotations": {},
        "kubernetes_httproute_parent_refs": [],
    }


def self_signed_certificate(common_name: str, *, days: int = 30) -> tuple[str, str, str]:
    """(cert PEM, key PEM, authentik-style fingerprint_sha256) of a fresh EC P-256 certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert_pem, key_pem, cert.fingerprint(hashes.SHA256()).hex(":")


def certificate_key_pair(kp_uuid: str, cert_pem: str, key_pem: str, fingerprint: str | None = None,
                         *, name: str | None = None) -> dict[str, Any]:
    """A `CertificateKeyPair` as `/api/v3/crypto/certificatekeypairs/<uuid>/` returns it.

    authentik writes fingerprints as lowercase hex pairs joined by ':'; `fingerprint` overrides the
    SHA-256 one (a test can change it to make the outpost re-fetch)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key_type = {rsa.RSAPublicKey: "rsa", ec.EllipticCurvePublicKey: "ec", dsa.DSAPublicKey: "dsa",
                ed25519.Ed25519PublicKey: "ed25519", ed448.Ed448PublicKey: "ed448"}
    kind = next((v for k, v in key_type.items() if isinstance(cert.public_key(), k)), None)
    base = f"/api/v3/crypto/certificatekeypairs/{kp_uuid}"
    return {
        "pk": kp_uuid,
        "name": name or f"keypair-{kp_uuid[:8]}",
        "fingerprint_sha256": fingerprint or cert.fingerprint(hashes.SHA256()).hex(":"),
        "fingerprint_sha1": cert.fingerprint(hashes.SHA1()).hex(":"),  # noqa: S303 - authentik shows it
        "cert_expiry": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cert_subject": cert.subject.rfc4514_string(),
        "private_key_available": bool(key_pem),
        "key_type": kind,
        "certificate_download_url": f"{base}/view_certificate/?download",
        "private_key_download_url": f"{base}/view_private_key/?download",
        "managed": None,
    }


# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased; a repeated field keeps its last value (see raw_headers)
    status: int = 0
    raw_headers: list[tuple[str, str]] = field(default_factory=list)  # as received: names as sent, in order
    peer: tuple[str, int] = ("", 0)  # the client address the double saw (the outpost's, behind it)

    def all(self, name: str) -> list[str]:
        """Every value of the field `name` (any case), in the order received."""
        return [v for k, v in self.raw_headers if k.lower() == name.lower()]


@dataclass
class Upload:
    """One request body read by `/upload/`: how many body bytes arrived, and whether all of it did."""

    method: str
    headers: dict[str, str]
    received: int = 0
    complete: bool = False


@dataclass
class WebsocketClient:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    messages: list[dict[str, Any]] = field(default_factory=list)  # received from the outpost
    sent: list[dict[str, Any]] = field(default_factory=list)  # sent to the outpost
    closed: bool = False
    frames: list[str | bytes] = field(default_factory=list)  # on /ws/client/: the data frames received (and echoed)


class _Connection:
    """One open websocket: the sans-I/O protocol plus the socket, writes serialised by a lock."""

    def __init__(self, sock: socket.socket, protocol: ServerProtocol, client: WebsocketClient) -> None:
        self.sock, self.protocol, self.client = sock, protocol, client
        self.lock = threading.Lock()

    def flush(self) -> None:  # with self.lock held
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)
            else:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def send_json(self, message: dict[str, Any]) -> bool:
        with self.lock:
            if self.protocol.state is not State.OPEN:
                return False
            self.protocol.send_text(json.dumps(message).encode())
            try:
                self.flush()
            except OSError:
                return False
        self.client.sent.append(message)
        return True

    def send_data(self, data: str | bytes) -> bool:
        """One text (str) or binary (bytes) frame."""
        with self.lock:
            if self.protocol.state is not State.OPEN:
                return False
            if isinstance(data, str):
                self.protocol.send_text(data.encode())
            else:
                self.protocol.send_binary(data)
            try:
                self.flush()
            except OSError:
                return False
        return True

    def close(self, code: int, reason: str, abrupt: bool) -> None:
        """Start the closing handshake (the reader loop finishes it), dropping the TCP connection
        if the peer has not answered within 2 s; or drop it at once when abrupt."""
        with self.lock:
            if not abrupt and self.protocol.state is State.OPEN:
                self.protocol.send_close(code, reason)
                try:
                    self.flush()
                except OSError:
                    pass
                timer = threading.Timer(2.0, self.close, (code, reason, True))
                timer.daemon = True
                timer.start()
                return
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_CERT_PATH = re.compile(r"^/api/v3/crypto/certificatekeypairs/([^/]+)/(view_certificate/|view_private_key/)?$")
_WS_PATH = re.compile(r"^/ws/outpost/([^/]+)/$")
ECHO_WS_PATH = "/ws/client/"  # authentik's UI websocket; here an echo
_FLOW_PATH = re.compile(r"^/if/flow/([^/]+)/$")

#: The backend's files, as an authentik server serves them: (Content-Type, body) by path.
BACKEND_FILES: dict[str, tuple[str, bytes]] = {
    "/static/dist/custom.css": ("text/css", b":root { --ak-accent: #fd4b2d; }\n"),
    "/static/dist/poly.js": ("application/javascript", b"/* authentik-api-double: poly.js */\n"),
    "/static/": ("text/plain", b"authentik-api-double: /static/\n"),
    "/static": ("text/plain", b"authentik-api-double: /static\n"),
    "/media/public/application-icons/app.svg": ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"/>\n'),
    "/help/": ("text/html; charset=utf-8", b"<!doctype html><title>authentik help</title>\n"),
}


class AuthentikAPIDouble:
    """authentik's outpost-facing API on 127.0.0.1:<free port>, in background threads.

    Use as a context manager (or start()/stop()); `url` is what AUTHENTIK_HOST should be."""

    def __init__(self, token: str | None = None, *, outpost_name: str = "mitm-outpost",
                 outpost_pk: str | None = None, refresh_interval_s: int = 300,
                 default_page_size: int = 100, max_page_size: int | None = None, port: int = 0) -> None:
        self.token = token or secrets.token_urlsafe(48)
        self.outpost_pk = outpost_pk or str(uuid.uuid4())
        self.outpost_name = outpost_name
        self.default_page_size, self.max_page_size = default_page_size, max_page_size
        self._lock = threading.RLock()
        self._providers: list[dict[str, Any]] = []
        self._certificates: dict[str, dict[str, Any]] = {}  # uuid -> {"pair", "cert", "key"}
        self._outpost_extra: dict[str, Any] = {"managed": None}
        self._config_overrides: dict[str, Any] = {}
        self._refresh_interval_s = refresh_interval_s
        self._down = False
        self._broken_json = False
        self.request_counts: Counter[str] = Counter()
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []
        self.ws_clients: list[WebsocketClient] = []
        self.hellos: list[dict[str, Any]] = []
        self.echo_clients: list[WebsocketClient] = []  # /ws/client/ connections (not outposts: not in `connected`)
        self.uploads: list[Upload] = []  # bodies read by /upload/, in arrival order
        self.server_version, self.build_hash = "2025.10.0", ""  # the authentik release the double stands for
        self._connections: list[_Connection] = []
        self._sockets: set[socket.socket] = set()
        self._changed = threading.Condition(self._lock)
        self._server = self._make_server(port)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self.root_config: dict[str, Any] = {
            "error_reporting": {"enabled": False, "sentry_dsn": "", "environment": "customer",
                                "send_pii": False, "traces_sample_rate": 0.4},
            "capabilities": ["can_save_media", "can_geo_ip", "can_impersonate"],
            "cache_timeout": 300, "cache_timeout_flows": 300, "cache_timeout_policies": 300,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The AUTHENTIK_HOST value (with the trailing slash authentik's docs use)."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ws_url(self, *, instance_uuid: str | None = None, attempt: int = 1, pk: str | None = None) -> str:
        query = urllib.parse.urlencode({"instance_uuid": instance_uuid or str(uuid.uuid4()), "attempt": attempt})
        return f"ws://127.0.0.1:{self.port}/ws/outpost/{pk or self.outpost_pk}/?{query}"

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> AuthentikAPIDouble:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"authentik-api-double:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (keep-alive HTTP ones too)."""
        self.disconnect_all(abrupt=True)
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> AuthentikAPIDouble:
        return self.start()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    def check(self) -> None:
        """Raise ContractViolation if any body served so far failed its schema."""
        if self.violations:
            raise ContractViolation("the double served bodies authentik would not:\n" + "\n".join(self.violations))

    # -- test control ---------------------------------------------------------------------------

    def set_providers(self, providers: Iterable[dict[str, Any]]) -> None:
        """Replace the provider list (each a full ProxyOutpostConfig, e.g. from make_provider)."""
        providers = [copy.deepcopy(p) for p in providers]
        for p in providers:
            validate("ProxyOutpostConfig", p)
        pks = [p["pk"] for p in providers]
        if len(set(pks)) != len(pks):
            raise ContractViolation(f"provider pks are not unique: {pks}")
        with self._lock:
            saved, self._providers = self._providers, providers
            try:
                validate("Outpost", self.outpost())
            except ContractViolation:
                self._providers = saved
                raise

    @property
    def providers(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._providers)

    def set_outpost(self, *, name: str | None = None, managed: Any = ...,
                    refresh_interval_s: int | None = None, **config: Any) -> None:
        """Change the outpost object: its name, `managed`, refresh interval, or `config` keys
        (authentik_host, log_level, ...; a key set to None is kept as null)."""
        if refresh_interval_s is not None and (type(refresh_interval_s) is not int or refresh_interval_s < 0):
            raise ContractViolation(f"refresh_interval_s must be a non-negative integer, got {refresh_interval_s!r}")
        with self._lock:
            saved = (self.outpost_name, dict(self._outpost_extra), self._refresh_interval_s,
                     dict(self._config_overrides))
            if name is not None:
                self.outpost_name = name
            if managed is not Ellipsis:
                self._outpost_extra["managed"] = managed
            if refresh_interval_s is not None:
                self._refresh_interval_s = refresh_interval_s
            self._config_overrides.update(config)
            try:
                validate("Outpost", self.outpost())
            except ContractViolation:
                (self.outpost_name, self._outpost_extra, self._refresh_interval_s, self._config_overrides) = saved
                raise

    def set_down(self, down: bool = True) -> None:
        """While down, every request (API and websocket handshake) is answered 503."""
        self._down = down

    def set_broken_json(self, broken: bool = True) -> None:
        """While broken, every API answer is 200 with a truncated JSON body."""
        self._broken_json = broken

    def add_certificate(self, kp_uuid: str, cert_pem: str, key_pem: str, fingerprint: str | None = None,
                        *, name: str | None = None) -> dict[str, Any]:
        """Add or replace a keypair; returns its CertificateKeyPair body."""
        pair = certificate_key_pair(kp_uuid, cert_pem, key_pem, fingerprint, name=name)
        validate("CertificateKeyPair", pair)
        with self._lock:
            self._certificates[kp_uuid] = {"pair": pair, "cert": cert_pem, "key": key_pem}
        return pair

    def count(self, path: str) -> int:
        """How many requests reached `path` (without query), whatever their answer."""
        with self._lock:
            return self.request_counts[path]

    def received(self, path: str) -> list[RecordedRequest]:
        """The requests that reached `path` (without query), oldest first."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def last(self, path: str) -> RecordedRequest:
        """The latest request to `path`; AssertionError when none came."""
        found = self.received(path)
        if not found:
            with self._lock:
                paths = sorted({r.path for r in self.requests})
            raise AssertionError(f"authentik double: no request to {path} (got {paths})")
        return found[-1]

    def certificate_fetches(self, kp_uuid: str) -> dict[str, int]:
        base = f"/api/v3/crypto/certificatekeypairs/{kp_uuid}/"
        return {"keypair": self.count(base), "certificate": self.count(base + "view_certificate/"),
                "private_key": self.count(base + "view_private_key/")}

    def reset_counters(self) -> None:
        with self._lock:
            self.request_counts.clear()
            self.requests.clear()
            self.uploads.clear()

    # -- bodies ---------------------------------------------------------------------------------

    def outpost(self) -> dict[str, Any]:
        """The Outpost object as `/api/v3/outposts/instances/` lists it now."""
        with self._lock:
            seconds = self._refresh_interval_s
            interval = f"minutes={seconds // 60}" if seconds % 60 == 0 else f"seconds={seconds}"
            config = {**outpost_default_config(self.url, interval), **self._config_overrides}
            return {
                "pk": self.outpost_pk,
                "name": self.outpost_name,
                "type": "proxy",
                "providers": [p["pk"] for p in self._providers],
                "providers_obj": [provider_obj(p) for p in self._providers],
                "service_connection": None,
                "service_connection_obj": None,
                "refresh_interval_s": seconds,
                "token_identifier": f"ak-outpost-{self.outpost_pk}-api",
                "config": config,
                "managed": self._outpost_extra["managed"],
            }

    def paginate(self, items: list[Any], query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """authentik's Pagination (DRF PageNumberPagination + Django Paginator, orphans=0)."""
        page_size = self.default_page_size
        if "page_size" in query:
            try:
                wanted = int(query["page_size"][-1])
                if wanted > 0:
                    page_size = min(wanted, self.max_page_size) if self.max_page_size else wanted
            except ValueError:
                pass
        count = len(items)
        num_pages = max(1, -(-count // page_size))
        raw = query.get("page", [""])[-1] or "1"  # DRF: query_params.get("page") or 1
        if raw == "last":
            raw = str(num_pages)
        try:
            number = int(raw)
        except ValueError:
            return 404, {"detail": "Invalid page."}
        if number < 1 or number > num_pages:
            return 404, {"detail": "Invalid page."}
        start = (number - 1) * page_size
        results = items[start:start + page_size]
        pagination = {
            "next": number + 1 if number < num_pages else 0,
            "previous": number - 1 if number > 1 else 0,
            "count": count,
            "current": number,
            "total_pages": num_pages,
            "start_index": 0 if count == 0 else start + 1,
            "end_index": count if number == num_pages else number * page_size,
        }
        return 200, {"pagination": pagination, "results": results, "autocomplete": {}}

    # -- websocket push -------------------------------------------------------------------------

    def _broadcast(self, message: dict[str, Any]) -> int:
        instruction, args = message.get("instruction"), message.get("args")
        if not (isinstance(instruction, int) and ACK <= instruction <= SESSION_END and isinstance(args, dict)):
            raise ContractViolation(f"not an authentik websocket message: {message!r}")
        with self._lock:
            connections = list(self._connections)
        return sum(c.send_json(message) for c in connections)

    def send_trigger_update(self) -> int:
        """TRIGGER_UPDATE to every connected outpost; returns how many got it."""
        return self._broadcast({"instruction": TRIGGER_UPDATE, "args": {}})

    def send_session_end(self, session_id: str) -> int:
        """SESSION_END (§12): `session_id` is sha256 hex of the Django session key (hash_session_key)."""
        if not isinstance(session_id, str):
            raise ContractViolation(f"session_id must be a string, got {session_id!r}")
        return self._broadcast({"instruction": SESSION_END,
                                "args": {"type": "event.session.end", "session_id": session_id}})

    def send_provider_specific(self, args: dict[str, Any]) -> int:
        return self._broadcast({"instruction": PROVIDER_SPECIFIC, "args": args})

    def disconnect_all(self, *, code: int = 1001, reason: str = "", abrupt: bool = False) -> int:
        """Close every websocket: a close frame first, unless abrupt (then the TCP connection just drops)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for c in connections:
            c.close(code, reason, abrupt)
        return len(connections)

    @property
    def connected(self) -> int:
        with self._lock:
            return len(self._connections)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"authentik double: no {what} within {timeout} s")
                self._changed.wait(left)

    def wait_for_connections(self, n: int = 1, timeout: float = 10.0) -> None:
        self.wait_for(lambda: len(self._connections) >= n, timeout, f"{n} websocket connection(s)")

    def version_outdated(self, hello: dict[str, Any]) -> bool:
        """authentik's OutpostState.version_outdated: with matching build hashes, an outpost whose
        version is older than the server's is flagged in the outpost list."""
        if not hello.get("version") or hello.get("buildHash", "") != self.build_hash:
            return False
        return packaging.version.parse(str(hello["version"])) < packaging.version.parse(self.server_version)

    def wait_for_hellos(self, n: int = 1, timeout: float = 10.0) -> None:
        self.wait_for(lambda: len(self.hellos) >= n, timeout, f"{n} HELLO(s)")

    def wait_for_requests(self, path: str, n: int = 1, timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.request_counts[path] >= n, timeout, f"{n} request(s) to {path}")

    # -- request handling (server threads) ------------------------------------------------------

    def _authenticate(self, header: str | None, anonymous_ok: bool) -> dict[str, str] | None:
        """None when allowed, else the 403 body DRF + authentik's TokenAuthentication give."""
        credentials = (header or "").strip()
        if credentials == "" or " " not in credentials:
            return None if anonymous_ok else {"detail": "Authentication credentials were not provided."}
        scheme, _, value = credentials.partition(" ")
        if scheme.lower() != "bearer":
            return {"detail": "Unsupported authentication type"}
        if value == "":
            return {"detail": "Malformed header"}
        if not secrets.compare_digest(value.encode(), self.token.encode()):
            return {"detail": "Token invalid/expired"}
        return None

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, Any]:
        """(status, schema name, body) for an authenticated GET."""
        if path == "/api/v3/outposts/instances/":
            status, body = self.paginate([self.outpost()], query)
            return status, "PaginatedOutpostList" if status == 200 else "GenericError", body
        if path == "/api/v3/outposts/proxy/":
            with self._lock:
                items = sorted(copy.deepcopy(self._providers), key=lambda p: p["name"])
            status, body = self.paginate(items, query)
            return status, "PaginatedProxyOutpostConfigList" if status == 200 else "GenericError", body
        if path == "/api/v3/root/config/":
            return 200, "Config", copy.deepcopy(self.root_config)
        if m := _CERT_PATH.match(path):
            with self._lock:
                entry = self._certificates.get(m.group(1))
            if entry is None:
                return 404, "GenericError", {"detail": "No CertificateKeyPair matches the given query."}
            if m.group(2) == "view_certificate/":
                return 200, "CertificateData", {"data": entry["cert"]}
            if m.group(2) == "view_private_key/":
                return 200, "CertificateData", {"data": entry["key"]}
            return 200, "CertificateKeyPair", copy.deepcopy(entry["pair"])
        return 404, "GenericError", {"detail": "Not found."}

    def _make_server(self, port: int = 0) -> ThreadingHTTPServer:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "authentik-api-double"
            sys_version = ""

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with double._lock:
                    double._sockets.add(self.connection)

            def finish(self) -> None:
                with double._lock:
                    double._sockets.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _record(self) -> tuple[RecordedRequest, str, dict[str, list[str]]]:
                split = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
                raw = list(self.headers.items())
                rec = RecordedRequest(self.command, split.path, query, {k.lower(): v for k, v in raw}, raw_headers=raw,
                                      peer=tuple(self.client_address[:2]))  # type: ignore[arg-type]
                with double._changed:
                    double.request_counts[split.path] += 1
                    double.requests.append(rec)
                    double._changed.notify_all()
                return rec, split.path, query

            def _send(self, rec: RecordedRequest, status: int, body: bytes,
                      content_type: str = "application/json") -> None:
                rec.status = status
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Vary", "Accept, Cookie")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _send_json(self, rec: RecordedRequest, status: int, schema: str, body: Any) -> None:
                try:
                    validate(schema, body)
                except ContractViolation as exc:
                    double.violations.append(f"{self.command} {self.path} -> {status}: {exc}")
                    error = {"detail": "contract violation", "error": str(exc)}
                    return self._send(rec, 500, json.dumps(error).encode())
                self._send(rec, status, json.dumps(body).encode())

            def do_GET(self) -> None:
                rec, path, query = self._record()
                if double._down:
                    return self._send(rec, 503, b"Service Unavailable\n", "text/plain")
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    return self._websocket(rec, path, query)
                if self._backend(rec, path, query):
                    return
                denied = double._authenticate(self.headers.get("Authorization"), path == "/api/v3/root/config/")
                if denied is not None:
                    return self._send_json(rec, 403, "GenericError", denied)
                if double._broken_json:
                    return self._send(rec, 200, b'{"pagination": {"next": 0, "previous": 0, "count": ')
                status, schema, body = double._route(path, query)
                self._send_json(rec, status, schema, body)

            def do_HEAD(self) -> None:
                self.do_GET()

            # -- the rest of the authentik server (the backend of an embedded outpost) ---------

            def _backend(self, rec: RecordedRequest, path: str, query: dict[str, list[str]]) -> bool:
                """Answer a GET/HEAD for one of the server's own pages or files; False for the API."""
                if path in BACKEND_FILES:
                    content_type, body = BACKEND_FILES[path]
                    self._send(rec, 200, body, content_type)
                elif m := _FLOW_PATH.match(path):
                    page = f"<!doctype html><title>authentik</title><ak-flow-executor flowSlug={m.group(1)}>"
                    self._send(rec, 200, page.encode(), "text/html; charset=utf-8")
                elif path in ("/-/health/live/", "/-/health/ready/"):
                    self._send(rec, 200, b"", "text/plain")
                elif path == "/slow/":
                    self._slow(rec, query)
                else:
                    return False
                return True

            def _slow(self, rec: RecordedRequest, query: dict[str, list[str]]) -> None:
                """`?seconds=S`: answer after S seconds. `&chunks=N`: N chunks (chunked encoding), the
                first at once and each next S seconds later, so a client sees whether they were streamed."""
                seconds = float(query.get("seconds", ["1"])[-1])
                chunks = int(query.get("chunks", ["0"])[-1])
                if not chunks:
                    time.sleep(seconds)
                    return self._send(rec, 200, json.dumps({"slept": seconds}).encode())
                rec.status = 200
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                try:
                    for i in range(chunks):
                        if i:
                            time.sleep(seconds)
                        data = f"chunk {i} at {time.time():.3f}\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True

            def _read_exactly(self, n: int, upload: Upload) -> None:
                while n:
                    chunk = self.rfile.read(min(n, 1 << 16))
                    if not chunk:
                        raise ConnectionError("the body ended early")
                    upload.received += len(chunk)
                    n -= len(chunk)

            def _upload(self, rec: RecordedRequest) -> None:
                """Read the whole body (Content-Length or chunked), counting it; answer {"received": n}."""
                upload = Upload(self.command, dict(rec.headers))
                with double._changed:
                    double.uploads.append(upload)
                try:
                    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                        while True:
                            line = self.rfile.readline(1024)
                            if not line.endswith(b"\n"):
                                raise ConnectionError("the chunked body ended early")
                            size = int(line.split(b";")[0].strip(), 16)
                            if size == 0:
                                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                                    pass  # trailers
                                break
                            self._read_exactly(size, upload)
                            if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                                raise ConnectionError("bad chunk end")
                    else:
                        self._read_exactly(int(self.headers.get("Content-Length") or 0), upload)
                    upload.complete = True
                except (OSError, ValueError):
                    self.close_connection = True
                    return
                finally:
                    with double._changed:
                        double._changed.notify_all()
                self._send(rec, 200, json.dumps({"received": upload.received}).encode())

            def _other(self) -> None:
                rec, path, _ = self._record()
                if path == "/upload/" and self.command in ("POST", "PUT") and not double._down:
                    return self._upload(rec)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if double._down:
                    return self._send(rec, 503, b"Service Unavailable\n", "text/plain")
                self._send_json(rec, 405, "GenericError", {"detail": f'Method "{self.command}" not allowed.'})

            do_POST = do_PUT = do_PATCH = do_DELETE = _other

            def _accept_websocket(self, rec: RecordedRequest) -> bool:
                """The handshake: websockets' sans-I/O protocol checks it and builds the 101 (or the refusal)."""
                response = ServerProtocol().accept(Request(self.path, Headers(list(self.headers.items()))))
                if response.status_code != 101:
                    self.close_connection = True
                    self._send(rec, response.status_code, response.body, "text/plain")
                    return False
                rec.status = 101
                self.wfile.write(response.serialize())
                return True

            def _websocket(self, rec: RecordedRequest, path: str, query: dict[str, list[str]]) -> None:
                if path == ECHO_WS_PATH:
                    return self._echo_websocket(rec, path, query)
                m = _WS_PATH.match(path)
                if m is None:
                    return self._send_json(rec, 404, "GenericError", {"detail": "Not found."})
                denied = double._authenticate(self.headers.get("Authorization"), anonymous_ok=False)
                if denied is not None or m.group(1) != double.outpost_pk:
                    self.close_connection = True
                    return self._send(rec, 403, b"", "text/plain")
                self._serve_websocket(rec, path, query, double.ws_clients, self._on_frame, pushed_to=True)

            def _echo_websocket(self, rec: RecordedRequest, path: str, query: dict[str, list[str]]) -> None:
                """`/ws/client/`: no token asked (authentik's UI sends its session cookie); echoes every data frame."""
                self._serve_websocket(rec, path, query, double.echo_clients, self._on_echo, pushed_to=False)

            def _serve_websocket(self, rec: RecordedRequest, path: str, query: dict[str, list[str]],
                                 clients: list[WebsocketClient], on_frame: Callable[[_Connection, Frame], None],
                                 pushed_to: bool) -> None:
                """Accept, then run the frames until the client goes; `pushed_to`: the double's pushes reach it."""
                if not self._accept_websocket(rec):
                    return
                # A second protocol, born OPEN (the first one's parser still expects a request), does the frames.
                client = WebsocketClient(path, query, {k.lower(): v for k, v in self.headers.items()})
                conn = _Connection(self.connection, ServerProtocol(state=State.OPEN), client)
                with double._changed:
                    clients.append(client)
                    if pushed_to:
                        double._connections.append(conn)
                    double._changed.notify_all()
                try:
                    self._websocket_loop(conn, on_frame)
                finally:
                    with double._changed:
                        client.closed = True
                        if conn in double._connections:
                            double._connections.remove(conn)
                        double._changed.notify_all()
                    self.close_connection = True

            def _on_echo(self, conn: _Connection, frame: Frame) -> None:
                if frame.opcode not in (Opcode.TEXT, Opcode.BINARY):
                    return
                data: str | bytes = frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)
                with double._changed:
                    conn.client.frames.append(data)
                    double._changed.notify_all()
                conn.send_data(data)

            def _on_frame(self, conn: _Connection, frame: Frame) -> None:
                if frame.opcode is Opcode.TEXT:
                    self._on_message(conn, frame.data)

            def _websocket_loop(self, conn: _Connection, on_frame: Callable[[_Connection, Frame], None]) -> None:
                sock = conn.sock
                sock.settimeout(None)
                while True:
                    try:
                        # rfile is unbuffered (rbufsize = 0), so nothing of the stream sits in it.
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    with conn.lock:
                        if data:
                            conn.protocol.receive_data(data)
                        else:
                            conn.protocol.receive_eof()
                        events = conn.protocol.events_received()
                        try:
                            conn.flush()
                        except OSError:
                            return
                    for frame in events:
                        on_frame(conn, frame)
                    if not data or conn.protocol.state is State.CLOSED:
                        return

            def _on_message(self, conn: _Connection, data: bytes) -> None:
                try:
                    message = json.loads(data)
                    instruction, args = message["instruction"], message.get("args", {})
                    if not isinstance(instruction, int) or not isinstance(args, dict):
                        raise ValueError(message)
                except (ValueError, KeyError, TypeError):
                    conn.close(1011, "", abrupt=False)  # the consumer raises; channels closes 1011
                    return
                with double._changed:
                    conn.client.messages.append(message)
                    if instruction == HELLO:
                        double.hellos.append(args)
                    double._changed.notify_all()
                if instruction != ACK:
                    conn.send_json({"instruction": ACK, "args": {}})

        Handler.rbufsize = 0  # unbuffered reads: the websocket loop reads the raw socket afterwards

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        return Server(("127.0.0.1", port), Handler)
