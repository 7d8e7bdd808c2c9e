"""Debugging in mitmweb and the mitmproxy console: commands and content views.

Loaded by `mitmdump`/`mitmweb -s addons/outpost.py` only, never by the lean production
runner, so `outpost.login_as` (a session without the IdP) cannot exist in production.
"""

import asyncio
import datetime
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import jwt
from mitmproxy import command, contentviews, ctx, http
from mitmproxy.addonmanager import Loader

from . import names
from .config_schema import PROVIDER_FIELDS
from .decision import METADATA_KEY
from .identity import build_session
from .oidc import HMAC_ALGORITHMS
from .registry import Registry
from .sessions import new_id

logger = logging.getLogger("mitm_outpost")

JWT_PATTERN = re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
TIME_CLAIMS = ("exp", "iat", "nbf", "auth_time")
SECRET_FIELDS = frozenset(k for k, f in PROVIDER_FIELDS.items() if f.secret)


def _when(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    moment = datetime.datetime.fromtimestamp(value, datetime.UTC)
    delta = value - time.time()
    relative = f"in {delta:.0f} s" if delta >= 0 else f"{-delta:.0f} s ago"
    return f"{value} ({moment:%Y-%m-%d %H:%M:%S} UTC, {relative})"


class JwtView(contentviews.Contentview):
    """Every JWT of a message (headers, cookies, form or JSON body): header, claims with
    readable times, and whether the signature verifies with the provider's keys."""

    name = "JWT"
    syntax_highlight: contentviews.SyntaxHighlight = "yaml"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def tokens(self, data: bytes, metadata: contentviews.Metadata) -> Iterator[tuple[str, str]]:
        message = metadata.http_message
        if message is not None:
            for name, value in message.headers.items(multi=True):
                for match in JWT_PATTERN.finditer(value.encode("latin-1", "replace")):
                    yield f"header {name}", match.group(0).decode()
        for match in JWT_PATTERN.finditer(data or b""):
            yield "body", match.group(0).decode()

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return 1.5 if JWT_PATTERN.search(data or b"") else -1

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        provider = None
        if metadata.flow is not None:
            provider = self.registry.by_name.get((metadata.flow.metadata.get(METADATA_KEY) or {}).get("provider", ""))
        parts = []
        for where, token in dict.fromkeys(self.tokens(data, metadata)):
            try:
                header = jwt.get_unverified_header(token)
                claims = jwt.decode(token, options={"verify_signature": False})
            except jwt.PyJWTError as e:
                parts.append(f"# {where}: not a JWT ({e})")
                continue
            shown = {k: (_when(v) if k in TIME_CLAIMS else v) for k, v in claims.items()}
            parts.append(f"# {where}\nheader: {json.dumps(header)}\n"
                         f"signature: {self.signature(token, header, provider)}\n"
                         f"claims:\n{json.dumps(shown, indent=2, ensure_ascii=False)}")
        if not parts:
            raise ValueError("no JWT in this message")
        return "\n\n".join(parts)

    @staticmethod
    def signature(token: str, header: dict[str, Any], provider: Any) -> str:
        if provider is None:
            return "not checked (no provider for this flow)"
        idp, alg = provider.idp, header.get("alg", "")
        if alg in HMAC_ALGORITHMS:
            key: Any = idp.client_secret.encode()
        elif idp.jwks is not None and header.get("kid", "") in idp.jwks.keys:
            key = idp.jwks.keys[header.get("kid", "")]
        else:
            return f"not checked (no key {header.get('kid')!r} of {provider.name}'s issuer loaded)"
        try:
            jwt.decode(token, key, algorithms=[alg], options={"verify_aud": False, "verify_exp": False})
        except jwt.PyJWTError as e:
            return f"INVALID for {provider.name}'s issuer: {e}"
        expired = ("exp" in (claims := jwt.decode(token, options={"verify_signature": False}))
                   and claims["exp"] < time.time())
        return f"valid ({alg}, {provider.name}'s issuer)" + (", but EXPIRED" if expired else "")


class IdentityView(contentviews.Contentview):
    """What the upstream received from the outpost, and what the client sent that was dropped."""

    name = "Outpost identity"
    syntax_highlight: contentviews.SyntaxHighlight = "yaml"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        return -1  # chosen by hand; never hides the body

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        flow = metadata.flow
        if not isinstance(flow, http.HTTPFlow):
            raise ValueError("not an HTTP flow")
        record = flow.metadata.get(METADATA_KEY) or {}
        ours = {n.lower() for n in (*names.ALL_IDENTITY_HEADERS, *names.FORWARDING_HEADERS, "Host", "Authorization")}
        sent = [f"  {k}: {v[:120]}" for k, v in flow.request.headers.items(multi=True) if k.lower() in ours]
        stripped = record.get("stripped_headers", "")
        lines = [f"decision: {record.get('outcome', '-')} ({record.get('reason', '')})",
                 f"provider: {record.get('provider', '-')}   session: {record.get('session', '-')}   "
                 f"user: {record.get('user', '-')}",
                 "identity and forwarding headers the upstream received:"
                 if record.get("outcome") in ("allowed", "skipped")
                 else "identity and forwarding headers on the request (not proxied):", *(sent or ["  (none)"]),
                 "client-sent headers the outpost dropped:",
                 *([f"  {n}" for n in stripped.split(", ")] if stripped else ["  (none)"])]
        return "\n".join(lines)


class Commands:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.views = [JwtView(registry), IdentityView()]

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_debug_login", bool, False,
                          "Enable the outpost.login_as command: "
                          "a session for any user without the IdP (debugging only).")
        for view in self.views:
            contentviews.add(view)

    @command.command("outpost.providers")
    def providers(self) -> str:
        """The providers this outpost serves, one per line."""
        return "\n".join(
            f"{p.name}: {p.mode.value} at {p.external_origin}"
            + (f" -> {p.backend.scheme}://{p.backend.host_header}" if p.backend else "")
            for p in self.registry.providers
        ) or "no providers"

    @command.command("outpost.sessions")
    def sessions(self, provider: str = "") -> str:
        """Sessions this outpost holds (with Redis: the ones in this replica's cache)."""
        rows = [f"{s.provider}: {s.username} (uid {s.sub}), ends in {s.expires_at - time.time():.0f} s"
                for s in self.registry.store.snapshot() if not provider or s.provider == provider]
        return "\n".join(rows) or "no sessions"

    @command.command("outpost.revoke")
    def revoke(self, user: str) -> str:
        """End every session of a user (username or uid) with every provider."""
        matches = {(s.provider, s.sub) for s in self.registry.store.snapshot() if user in (s.sub, s.username)}
        for provider, sub in matches:
            asyncio.ensure_future(self.registry.store.delete_user(provider, sub))
        return f"ending the sessions of {user} with {len(matches)} provider(s)" if matches else f"no session of {user}"

    @command.command("outpost.config")
    def config(self) -> str:
        """The providers' configuration, secrets masked."""
        masked = [{k: ("***" if k in SECRET_FIELDS and v else v)
                   for k, v in p.settings.items() if v not in (None, "", [])}
                  for p in self.registry.providers]
        return json.dumps({"outpost": self.registry.outpost_name, "providers": masked}, indent=2, default=str)

    @command.command("outpost.reload")
    def reload(self) -> None:
        """Read mitm_config.yaml again (a bad file is refused; the old one keeps serving)."""
        ctx.options.update(outpost_config=ctx.options.outpost_config)

    @command.command("outpost.login_as")
    def login_as(self, provider: str, user: str) -> str:
        """A session for `user` without the IdP, for debugging: returns the Cookie header to use."""
        if not ctx.options.outpost_debug_login:
            raise ValueError("outpost.login_as is off: start with --set outpost_debug_login=true (never in production)")
        target = self.registry.by_name.get(provider)
        if target is None:
            raise ValueError(f"no provider {provider!r}")
        session = build_session(target, {"sub": user, "preferred_username": user}, "", "", self.registry.legacy_headers)
        session_id = new_id()
        asyncio.ensure_future(self.registry.store.put(session_id, session))
        logger.warning("outpost.login_as: debugging session for %s at %s", user, provider)
        return f"Cookie: {target.cookie_name}={urllib.parse.quote(session_id)}"
