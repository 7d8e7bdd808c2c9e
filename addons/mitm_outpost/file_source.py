"""The FileSource addon: providers from `mitm_config.yaml` (the authentik API is the other source, authentik.py)."""

import asyncio
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from . import config_schema, provider
from .names import AUTHENTIK_RELEASE
from .provider import Provider
from .registry import ProviderSet, Registry, parse_networks
from .sessions import MemoryStore, SessionStore

logger = logging.getLogger("mitm_outpost")
for noisy in ("httpx2", "httpcore2", "httpx", "httpcore"):  # one line per IdP call is our job, not theirs
    logging.getLogger(noisy).setLevel(logging.WARNING)

DEFAULT_CONFIG = "mitm_config.yaml"


def build_providers(path: str, release: str) -> tuple[config_schema.OutpostConfig, tuple[Provider, ...]]:
    cfg = config_schema.load(path)
    return cfg, build_all(cfg, release)


def build_all(cfg: config_schema.OutpostConfig, release: str) -> tuple[Provider, ...]:
    """Every provider of a parsed file: discovery and JWKS over the network (blocking: run it off the loop)."""
    return tuple(provider.build(entry, cfg.name, release=release) for entry in cfg.providers)


def make_store(cfg: config_schema.OutpostConfig) -> SessionStore:
    if cfg.session_store == "memory":
        return MemoryStore()
    from .redis_store import RedisStore

    return RedisStore(cfg.session_store, cfg.session_store_password or None)


RELEASE = re.compile(r"\d{4}\.\d{1,2}\.\d+(-rc\d+)?")
RELOAD_TIMEOUT = 60  # seconds a reload may take (discovery, JWKS of every provider) before it is given up


class FileSource:
    """Reads `outpost_config`. At start the file is read before anything is served (an error
    stops the outpost); later (SIGHUP, `outpost.reload`, `set outpost_config=...`) a file that
    does not parse is refused at once, and the rest (discovery, JWKS, regexes) is built in a
    worker thread while the old set keeps serving, then swapped in whole."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.store_spec = ("memory", "")
        self.serving = False  # `running` has been reached: reloads happen in the background
        self.reloading: asyncio.Task[None] | None = None

    def running(self) -> None:
        self.serving = True
        start = getattr(self.registry.store, "start", None)
        if start is not None:
            start()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "outpost_config", str, os.environ.get("OUTPOST_CONFIG", DEFAULT_CONFIG),
            "Path of the outpost's provider configuration (YAML). Env OUTPOST_CONFIG sets the default.",
        )
        loader.add_option(
            "trusted_proxies", Sequence[str], ["127.0.0.0/8", "::1/128"],
            "Networks (CIDR) of the reverse proxies whose X-Forwarded-*/X-Original-* headers the outpost believes; "
            "forward-auth checks from anywhere else get 403.",
        )
        loader.add_option(
            "outpost_log_decisions", bool, False,
            "Log one line per request with the decision (the flow comment shows it in mitmweb anyway).",
        )
        loader.add_option(
            "outpost_authentik_version", str, AUTHENTIK_RELEASE,
            "The authentik release the outpost reports (websocket HELLO, X-authentik-meta-version), as authentik's "
            "own outpost of that release would; read at start.",
        )
        loader.add_option(
            "outpost_legacy_headers", bool, True,
            "Also send the pre-2022 identity header names (X-Auth-Username, X-Forwarded-Email, ...).",
        )

    def configure(self, updated: set[str]) -> None:
        if "trusted_proxies" in updated:
            self.registry.trusted_networks = parse_networks(ctx.options.trusted_proxies)
        if "outpost_log_decisions" in updated:
            logger.setLevel(logging.DEBUG if ctx.options.outpost_log_decisions else logging.INFO)
        if "outpost_legacy_headers" in updated:
            self.registry.legacy_headers = ctx.options.outpost_legacy_headers
        if "outpost_authentik_version" in updated:
            if not RELEASE.fullmatch(ctx.options.outpost_authentik_version):
                raise exceptions.OptionsError("outpost_authentik_version: an authentik release such as 2025.10.0")
            self.registry.authentik_release = ctx.options.outpost_authentik_version
        if "outpost_config" not in updated:
            return
        path = str(Path(ctx.options.outpost_config).expanduser())
        if os.environ.get("AUTHENTIK_HOST") and not Path(path).exists():
            logger.info("no %s: providers come from authentik only", path)
            return
        if not self.serving:
            try:
                self.install(*build_providers(path, self.registry.authentik_release))
            except config_schema.ConfigError as e:
                # An error-level log line makes mitmproxy exit with status 1 (its errorcheck addon)
                # before anything is served; raising would add a traceback.
                logger.error("configuration error: %s", e)
            return
        try:
            cfg = config_schema.load(path)
        except config_schema.ConfigError as e:
            raise exceptions.OptionsError(f"configuration error: {e}") from None  # the old set keeps serving
        if self.reloading is not None:
            self.reloading.cancel()  # the newest file wins
        self.reloading = asyncio.get_running_loop().create_task(self.reload(cfg, path))

    async def reload(self, cfg: config_schema.OutpostConfig, path: str) -> None:
        try:
            release = self.registry.authentik_release
            providers = await asyncio.wait_for(asyncio.to_thread(build_all, cfg, release), RELOAD_TIMEOUT)
            self.install(cfg, providers)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            logger.error("reload of %s refused: not complete within %d s; the previous configuration keeps serving",
                         path, RELOAD_TIMEOUT)
        except config_schema.ConfigError as e:
            logger.error("reload refused, the previous configuration keeps serving: configuration error: %s", e)
        finally:
            if self.reloading is asyncio.current_task():
                self.reloading = None

    def install(self, cfg: config_schema.OutpostConfig, providers: tuple[Provider, ...]) -> None:
        spec = (cfg.session_store, cfg.session_store_password)
        store = make_store(cfg) if spec != self.store_spec else None
        self.registry.install(ProviderSet.build(cfg.name, {**self.registry.sources, "file": providers}), store)
        self.store_spec = spec
        logger.info(
            "outpost %r serving %s", cfg.name,
            ", ".join(f"{p.name} ({p.mode.value}) at {p.external_origin}" for p in providers),
        )
