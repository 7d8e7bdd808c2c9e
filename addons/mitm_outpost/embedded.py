"""The Embedded addon: the outpost in authentik's own place, on 9000/9443 (seed 003).

authentik's embedded outpost routes every request in this order: `/static`, `/media` and
`/help` are authentik's files; `/outpost.goauthentik.io` is the outpost's on any host; a
provider's host is the outpost's; everything else is authentik's. With `outpost_embedded`
on, Routing follows that order and sends authentik's share to the server named here, through
the same edge rules as every request (identity headers stripped, X-Forwarded-* ours,
hop-by-hop removed, WebSockets passed, a body limit as authentik's own server has).
"""

from dataclasses import dataclass

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from .authentik import env_bool, env_value
from .provider import Backend
from .registry import Registry
from .urls import parse_origin_url

BACKEND_PATHS = ("/static", "/media", "/help")  # authentik's packaged files and uploaded media
BODY_LIMIT = 32 * 1024 * 1024  # authentik's own server refuses larger bodies


@dataclass(frozen=True, slots=True)
class EmbeddedBackend:
    backend: Backend
    body_limit: int


def is_backend_path(path: str) -> bool:
    """`/static` and `/static/...` (and the others), never `/staticx`."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in BACKEND_PATHS)


class Embedded:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_embedded", bool, False,
                          "Stand in for authentik's embedded outpost: requests that are not the outpost's go to the "
                          "authentik server (seed 003's order) instead of getting 400.")
        loader.add_option("outpost_embedded_backend", str, "",
                          "The authentik server behind the embedded outpost (empty: AUTHENTIK_HOST).")
        loader.add_option("outpost_embedded_body_limit", int, BODY_LIMIT,
                          "Largest request body sent to the authentik server, in bytes; larger gets 413.")

    def configure(self, updated: set[str]) -> None:
        if not updated & {"outpost_embedded", "outpost_embedded_backend", "outpost_embedded_body_limit"}:
            return
        if not ctx.options.outpost_embedded:
            self.registry.embedded = None
            return
        url = ctx.options.outpost_embedded_backend or env_value("AUTHENTIK_HOST")
        if not url:
            raise exceptions.OptionsError("outpost_embedded: name the authentik server with outpost_embedded_backend "
                                          "or AUTHENTIK_HOST")
        if ctx.options.outpost_embedded_body_limit < 1:
            raise exceptions.OptionsError("outpost_embedded_body_limit: a positive number of bytes")
        try:
            parsed = parse_origin_url(url.split("?", 1)[0].rstrip("/"))
        except ValueError as e:
            raise exceptions.OptionsError(f"outpost_embedded_backend: {e}") from None
        scheme = parsed.protocol.rstrip(":")
        port = int(parsed.port or (443 if scheme == "https" else 80))
        verify = not (env_bool("AUTHENTIK_INSECURE") and not ctx.options.outpost_embedded_backend)
        backend = Backend(scheme, parsed.hostname, port, parsed.host, verify, keep_client_host=True)
        self.registry.embedded = EmbeddedBackend(backend, ctx.options.outpost_embedded_body_limit)
        # authentik asks browsers for a client certificate on 9443 (its mTLS stage reads it from the outpost)
        if not ctx.options.request_client_cert:
            ctx.options.update(request_client_cert=True)
