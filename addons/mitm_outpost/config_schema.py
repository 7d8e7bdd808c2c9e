"""Reading and validating `mitm_config.yaml`.

Provider entries use authentik's own field names so that a provider exported from authentik
reads the same. Everything is checked before anything starts: one bad field is one clear
message naming the provider and the field.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .names import Mode


class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass(frozen=True)
class Field:
    type: type | tuple[type, ...]
    default: Any = None
    required: bool = False
    secret: bool = False


DEFAULT_SCOPES = ("openid", "profile", "email")

# The provider keys we understand (authentik's names, plus `issuer` and explicit endpoints).
PROVIDER_FIELDS: dict[str, Field] = {
    "name": Field(str, required=True),
    "external_host": Field(str, required=True),
    "mode": Field(str, default=Mode.PROXY.value),
    "internal_host": Field(str, default=""),
    "internal_host_ssl_validation": Field(bool, default=True),
    # Not an authentik field: the Host the application receives, the client's (authentik's behaviour)
    # or internal_host's.
    "upstream_host": Field(str, default="client"),
    "client_id": Field(str, required=True),
    "client_secret": Field(str, default="", secret=True),
    "cookie_secret": Field(str, default="", secret=True),
    "cookie_domain": Field(str, default=""),
    "skip_path_regex": Field(str, default=""),
    "basic_auth_enabled": Field(bool, default=False),
    "basic_auth_user_attribute": Field(str, default=""),
    "basic_auth_password_attribute": Field(str, default=""),
    "intercept_header_auth": Field(bool, default=True),
    "verify_bearer_jwt_locally": Field(bool, default=False),
    "access_token_validity": Field((int, float), default=86400),
    "scopes_to_request": Field(list, default=list(DEFAULT_SCOPES)),
    "issuer": Field(str, default=""),
    "authorization_endpoint": Field(str, default=""),
    "token_endpoint": Field(str, default=""),
    "jwks_uri": Field(str, default=""),
    "end_session_endpoint": Field(str, default=""),
    "userinfo_endpoint": Field(str, default=""),
    "introspection_endpoint": Field(str, default=""),
    "certificate": Field(str, default=""),
    "assigned_application_slug": Field(str, default=""),
    "assigned_application_name": Field(str, default=""),
    # Present in authentik exports; accepted so an export loads, used for nothing else.
    "pk": Field((int, str), default=None),
    "oidc_configuration": Field(dict, default=None),
}
EXPLICIT_ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri")
UPSTREAM_HOSTS = ("client", "internal")  # `upstream_host`: whose Host the application receives

OUTPOST_FIELDS: dict[str, Field] = {
    "name": Field(str, default="mitm-outpost"),
    "session_store": Field(str, default="memory"),  # or redis://, rediss://, unix:// (Valkey too)
    "session_store_password": Field(str, default="", secret=True),
}

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class OutpostConfig:
    name: str
    providers: tuple[dict[str, Any], ...] = field(default=())
    session_store: str = "memory"
    session_store_password: str = ""


def load(path: str | os.PathLike[str]) -> OutpostConfig:
    """Parse and check the file. Raises ConfigError with a message naming file, provider and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return parse(doc, base=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse(doc: Any, base: Path = Path(".")) -> OutpostConfig:
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping with a 'providers' list")
    _no_unknown_keys(doc, {"outpost", "providers"}, "top level")
    outpost = _check_fields(doc.get("outpost") or {}, OUTPOST_FIELDS, "section 'outpost'", base)
    entries = doc.get("providers")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("'providers' must be a non-empty list")
    providers = []
    seen_names: set[str] = set()
    for index, entry in enumerate(entries):
        label = f"provider #{index + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = f"provider '{entry['name']}'"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: must be a mapping of fields")
        values = _check_fields(entry, PROVIDER_FIELDS, label, base)
        _check_provider(values, label)
        if values["name"] in seen_names:
            raise ConfigError(f"{label}: field 'name': another provider already has this name")
        seen_names.add(values["name"])
        providers.append(values)
    store = outpost["session_store"]
    if store != "memory" and not store.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("section 'outpost': field 'session_store': "
                          "must be 'memory' or a redis://, rediss:// or unix:// URL")
    return OutpostConfig(outpost["name"], tuple(providers), store, outpost["session_store_password"])


def _check_fields(entry: dict, fields: dict[str, Field], label: str, base: Path) -> dict[str, Any]:
    file_keys = {f"{k}_file" for k in fields}
    _no_unknown_keys(entry, set(fields) | file_keys, label)
    values: dict[str, Any] = {}
    for key, spec in fields.items():
        if f"{key}_file" in entry:
            if key in entry:
                raise ConfigError(f"{label}: field '{key}': give either '{key}' or '{key}_file', not both")
            value: Any = _read_secret_file(entry[f"{key}_file"], base, label, f"{key}_file")
        elif key in entry and entry[key] is not None:
            value = _expand_env(entry[key], label, key)
        elif spec.required:
            raise ConfigError(f"{label}: field '{key}': required")
        else:
            value = spec.default
        if value is not None and not _has_type(value, spec.type):
            wanted = spec.type.__name__ if isinstance(spec.type, type) else " or ".join(t.__name__ for t in spec.type)
            raise ConfigError(f"{label}: field '{key}': expected {wanted}, got {type(value).__name__}")
        values[key] = value
    return values


def _has_type(value: Any, wanted: type | tuple[type, ...]) -> bool:
    types = wanted if isinstance(wanted, tuple) else (wanted,)
    if isinstance(value, bool):  # YAML `yes` must not pass for a number
        return bool in types
    return isinstance(value, types)


def _no_unknown_keys(entry: dict, known: set[str], label: str) -> None:
    unknown = sorted(str(k) for k in entry if k not in known)
    if unknown:
        raise ConfigError(f"{label}: unknown field '{unknown[0]}'")


def _expand_env(value: Any, label: str, key: str) -> Any:
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in os.environ:
            raise ConfigError(f"{label}: field '{key}': environment variable {var} is not set")
        return os.environ[var]

    return _ENV_REF.sub(lookup, value)


def _read_secret_file(value: Any, base: Path, label: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{label}: field '{key}': expected a file path")
    path = base / _expand_env(value, label, key)
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"{label}: field '{key}': cannot read {path}: {e.strerror}") from None


def _check_provider(values: dict[str, Any], label: str) -> None:
    try:
        Mode(values["mode"])
    except ValueError:
        modes = ", ".join(m.value for m in Mode)
        raise ConfigError(f"{label}: field 'mode': must be one of {modes}") from None
    if values["mode"] == Mode.PROXY and not values["internal_host"]:
        raise ConfigError(f"{label}: field 'internal_host': required in {Mode.PROXY} mode")
    if values["upstream_host"] not in UPSTREAM_HOSTS:
        raise ConfigError(f"{label}: field 'upstream_host': must be one of {', '.join(UPSTREAM_HOSTS)}")
    if values["mode"] == Mode.FORWARD_DOMAIN and not values["cookie_domain"]:
        raise ConfigError(
            f"{label}: field 'cookie_domain': required in {Mode.FORWARD_DOMAIN} mode")
    oidc = values["oidc_configuration"] or {}
    for endpoint in ("issuer", *EXPLICIT_ENDPOINTS, "end_session_endpoint", "userinfo_endpoint",
                     "introspection_endpoint"):
        if not values[endpoint] and isinstance(oidc.get(endpoint), str):
            values[endpoint] = oidc[endpoint]
    if not values["issuer"]:
        raise ConfigError(f"{label}: field 'issuer': required (OIDC discovery), or give oidc_configuration")
    if not all(isinstance(s, str) and s for s in values["scopes_to_request"]):
        raise ConfigError(f"{label}: field 'scopes_to_request': must be a list of scope names")
    if "openid" not in values["scopes_to_request"]:
        raise ConfigError(f"{label}: field 'scopes_to_request': must include 'openid'")
    if values["access_token_validity"] <= 0:
        raise ConfigError(f"{label}: field 'access_token_validity': must be a positive number of seconds")
    if values["basic_auth_enabled"] and not values["basic_auth_password_attribute"]:
        raise ConfigError(f"{label}: field 'basic_auth_password_attribute': required when basic_auth_enabled is on")
