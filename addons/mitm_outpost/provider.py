"""The provider model: one immutable object per protected application.

Built and validated once, at configure time. It holds everything the per-request path
needs, already computed (cookie names and attributes, parsed URLs, compiled skip rules,
static headers, the OIDC client), so a request costs dictionary look-ups.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

import re2

from . import names
from .config_schema import ConfigError
from .identity import as_fields
from .names import Mode
from .oidc import DiscoveryError, IdentityProvider
from .urls import host_keys, origin, parse_origin_url, safe_redirect

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@dataclass(frozen=True, slots=True)
class Backend:
    scheme: str
    host: str
    port: int
    host_header: str  # internal_host's own host[:port]
    verify_tls: bool
    keep_client_host: bool  # the application receives the client's Host (authentik's way), not host_header


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    mode: Mode
    external_origin: str  # scheme://host[:port], as the browser sees it
    hostname: str
    port: int
    cookie_domain: str  # lower-case, no leading dot; "" unless set
    host_keys: tuple[str, ...]
    backend: Backend | None  # where requests go (internal_host); None in forward-auth modes
    client_id: str
    cookie_name: str
    login_cookie_name: str
    cookie_attributes: str  # everything after `name=value`
    session_lifetime: int
    scope: str
    redirect_uri: str
    legacy_redirect_uri: str  # for logins started under /akprox/ (configs written for authentik < 2022.2)
    intercept_header_auth: bool
    verify_bearer_jwt_locally: bool
    skip_rules: Any  # a compiled RE2 program, or None
    static_headers: tuple[tuple[bytes, bytes], ...]  # the meta headers, in wire form
    state_key: bytes
    idp: IdentityProvider
    certificate: str
    basic_auth: tuple[str, str] | None  # (user attribute, password attribute) when Basic goes upstream
    settings: dict[str, Any]  # the validated config entry, for display

    @property
    def www_authenticate(self) -> str:
        return f'Bearer realm="{self.name}", Basic realm="{self.name}"'

    def set_cookie(self, name: str, value: str, max_age: int) -> str:
        return f"{name}={value}; Max-Age={max_age}; {self.cookie_attributes}"

    def clear_cookie(self, name: str) -> str:
        return f"{name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:01 GMT; {self.cookie_attributes}"

    def is_skipped(self, target: str) -> bool:
        """Does an unauthenticated-path rule match? `target` is the normalised path (proxy and
        single application) or scheme://host/path (domain level); never the query string."""
        return bool(target) and self.skip_rules is not None and self.skip_rules.search(target) is not None

    def safe_redirect(self, rd: str) -> str | None:
        """Where a browser may be sent after login: this provider's origin, or for domain level
        any host inside the cookie domain (on a dot boundary) with the external host's scheme."""
        domain = self.cookie_domain if self.mode is Mode.FORWARD_DOMAIN else ""
        return safe_redirect(rd, self.external_origin, domain)


def build(settings: dict[str, Any], outpost_name: str, idp: IdentityProvider | None = None,
          release: str = names.AUTHENTIK_RELEASE) -> Provider:
    """Turn one validated config entry into a Provider. Raises ConfigError naming the field.
    `release`: the authentik release the outpost reports (names.AUTHENTIK_RELEASE)."""
    label = f"provider '{settings['name']}'"
    try:
        external = parse_origin_url(settings["external_host"])
    except ValueError as e:
        raise ConfigError(f"{label}: field 'external_host': {e}") from None
    external_origin = origin(external)
    backend = None
    if settings["internal_host"]:
        try:
            internal = parse_origin_url(settings["internal_host"].rstrip("/"))
        except ValueError as e:
            raise ConfigError(f"{label}: field 'internal_host': {e}") from None
        scheme = internal.protocol.rstrip(":")
        port = int(internal.port or (443 if scheme == "https" else 80))
        backend = Backend(scheme, internal.hostname, port, internal.host, settings["internal_host_ssl_validation"],
                          settings["upstream_host"] == "client")
    client_id = settings["client_id"]
    secure = external.protocol == "https:"
    attributes = ["Path=/"]
    if settings["cookie_domain"]:
        attributes.append(f"Domain={settings['cookie_domain'].lstrip('.')}")
    attributes += ["HttpOnly", "SameSite=Lax"] + (["Secure"] if secure else [])
    if idp is None:
        try:
            idp = IdentityProvider.from_settings(settings)
        except DiscoveryError as e:
            raise ConfigError(f"{label}: field 'issuer': {e}") from None
    slug = settings["assigned_application_slug"] or settings["name"]
    static = (
        (names.META_JWKS, idp.jwks_uri),
        (names.META_OUTPOST, outpost_name),
        (names.META_PROVIDER, settings["name"]),
        (names.META_APP, slug),
        (names.META_VERSION, names.reported_version(release)),
    )
    return Provider(
        name=settings["name"],
        mode=Mode(settings["mode"]),
        external_origin=external_origin,
        hostname=external.hostname,
        port=int(external.port or (443 if secure else 80)),
        cookie_domain=settings["cookie_domain"].lower().lstrip("."),
        host_keys=host_keys(external),
        backend=backend,
        client_id=client_id,
        cookie_name=names.cookie_name(client_id),
        login_cookie_name=names.login_cookie_name(client_id),
        cookie_attributes="; ".join(attributes),
        session_lifetime=int(settings["access_token_validity"]),
        scope=" ".join(settings["scopes_to_request"]),
        redirect_uri=f"{external_origin}{names.CALLBACK_PATH}?{names.CALLBACK_QUERY}",
        legacy_redirect_uri=f"{external_origin}{names.LEGACY_CALLBACK_PATH}?{names.CALLBACK_QUERY}",
        intercept_header_auth=settings["intercept_header_auth"],
        verify_bearer_jwt_locally=settings["verify_bearer_jwt_locally"],
        skip_rules=compile_skip_rules(settings["skip_path_regex"], label),
        static_headers=as_fields(static),
        state_key=_state_key(settings),
        idp=idp,
        certificate=settings["certificate"],
        basic_auth=(settings["basic_auth_user_attribute"], settings["basic_auth_password_attribute"])
        if settings["basic_auth_enabled"] else None,
        settings=settings,
    )


def compile_skip_rules(text: str, label: str) -> Any:
    """One RE2 program for all of a provider's unauthenticated-path rules (Go semantics, unanchored).

    Blank lines are ignored (in authentik a blank line matches everything); a line that does
    not compile is an error naming the line, never a silent skip.
    """
    rules = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            re2.compile(line, _RE2_OPTIONS)
        except re2.error as e:
            detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
            raise ConfigError(f"{label}: field 'skip_path_regex': line {number} {line!r}: {detail}") from None
        rules.append(f"(?:{line})")
    return re2.compile("|".join(rules), _RE2_OPTIONS) if rules else None


def _state_key(settings: dict[str, Any]) -> bytes:
    """The key that signs login state. Derived from configured secrets so every replica agrees."""
    secret = settings["cookie_secret"] or settings["client_secret"]
    if not secret:
        raise ConfigError(
            f"provider '{settings['name']}': field 'cookie_secret': required when the client has no client_secret"
        )
    return hashlib.sha256(b"mitm-outpost login state\0" + secret.encode()).digest()
