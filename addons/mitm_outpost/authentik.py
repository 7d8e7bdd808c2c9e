"""The AuthentikSource addon: providers from an authentik server, as authentik's own outpost gets them.

With AUTHENTIK_HOST and AUTHENTIK_TOKEN set, the outpost reads its outpost instance and the
paginated proxy-provider list from the API (spec §2.2), maps each provider into the same
model `mitm_config.yaml` builds, and swaps the set in whole: at start, every
`refresh_interval_s`, on SIGUSR1 and when the server says so over the websocket. A refresh
that fails keeps the last good set; a provider that fails to build is dropped with a log line.
The websocket also carries SESSION_END: the sessions of that authentik session end here too.
"""

import asyncio
import json
import logging
import os
import platform
import random
import signal
import ssl
import sys
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import websockets
from mitmproxy import ctx

from . import __version__, config_schema, names, provider
from .oidc import IdentityProvider
from .provider import Provider
from .registry import Registry

logger = logging.getLogger("mitm_outpost")

API = "api/v3/"
PAGE_SIZE = 100
REFRESH_DEFAULT, REFRESH_MIN = 300, 30
HELLO_INTERVAL = 10
# The HELLO's `version` is the authentik release reported (Registry.authentik_release); who we are goes here.
IMPLEMENTATION = f"mitm-outpost {__version__} (Python {platform.python_version()})"
USER_AGENT = f"goauthentik.io/outpost/{names.AUTHENTIK_RELEASE} mitm-outpost/{__version__}"
STARTUP_RETRY = 3.0
BACKOFF_MAX = 300.0
HELLO, TRIGGER_UPDATE, SESSION_END = 1, 2, 4
# Fields of authentik's ProxyOutpostConfig that we read; anything else it sends is ignored.
PROVIDER_FIELDS = tuple(k for k in config_schema.PROVIDER_FIELDS
                        if k not in ("issuer", "certificate", *config_schema.EXPLICIT_ENDPOINTS,
                                     "end_session_endpoint", "userinfo_endpoint",
                                     "introspection_endpoint", "verify_bearer_jwt_locally"))


class InvalidToken(Exception):
    pass


def env_value(name: str) -> str:
    """authentik's `file://` and `env://` indirections (spec §2.1)."""
    value = os.environ.get(name, "")
    if value.startswith("file://"):
        return Path(value[len("file://"):]).read_text().strip()
    if value.startswith("env://"):
        return os.environ.get(value[len("env://"):], "")
    return value


def env_bool(name: str) -> bool:
    return env_value(name).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    host: str  # scheme://host/path/, without AUTHENTIK_HOST's query
    token: str
    insecure: bool
    host_browser: str
    query: str = ""  # AUTHENTIK_HOST's query, merged into the websocket URL (spec §2.3)

    @classmethod
    def from_env(cls) -> "Settings | None":
        host, token = env_value("AUTHENTIK_HOST"), env_value("AUTHENTIK_TOKEN")
        if not host and not token:
            return None
        if not host or not token:
            missing = "AUTHENTIK_HOST" if not host else "AUTHENTIK_TOKEN"
            raise SystemExit(f"{missing} is not set.\n{USAGE}")
        parts = urllib.parse.urlsplit(host)
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
        return cls(base, token, env_bool("AUTHENTIK_INSECURE"), env_value("AUTHENTIK_HOST_BROWSER"), parts.query)

    @property
    def websocket_base(self) -> str:
        parts = urllib.parse.urlsplit(self.host)
        return urllib.parse.urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path, "", ""))


USAGE = """mitm-outpost takes its providers from authentik when both are set:
  AUTHENTIK_HOST=https://authentik.example.com   where the outpost reaches authentik
  AUTHENTIK_TOKEN=...                            the outpost's token (authentik: Outposts > Deployment info)
optional: AUTHENTIK_INSECURE=true, AUTHENTIK_HOST_BROWSER=https://..., AUTHENTIK_LISTEN__HTTP/__HTTPS/__METRICS
Without them, providers come from mitm_config.yaml."""


class Api:
    """The few authentik API calls an outpost makes, with its token."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = httpx2.AsyncClient(
            base_url=settings.host + API, timeout=15, verify=not settings.insecure,
            headers={"Authorization": f"Bearer {settings.token}", "User-Agent": USER_AGENT},
        )

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.client.get(path, params=params)
        if response.status_code in (401, 403):
            raise InvalidToken(f"authentik refused the token ({response.status_code}) at {response.url}")
        response.raise_for_status()
        try:
            return response.json()
        except json.JSONDecodeError:
            raise ValueError(f"{response.url} did not answer JSON") from None

    async def outpost(self) -> dict[str, Any]:
        answer = await self.get("outposts/instances/")
        results = answer.get("results") if isinstance(answer, dict) else None
        if not results:
            raise ValueError("authentik lists no outpost for this token")
        return dict(results[0])

    async def providers(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page = 1
        while page:
            answer = await self.get("outposts/proxy/", page=page, page_size=PAGE_SIZE)
            found += answer["results"]
            page = int(answer["pagination"].get("next") or 0)
        return found

    async def aclose(self) -> None:
        await self.client.aclose()


class AuthentikSource:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.settings: Settings | None = None
        self.instance = str(uuid.uuid4())
        self.outpost: dict[str, Any] = {}
        self.certificates: dict[str, tuple[str, Path]] = {}  # uuid -> (fingerprint, pem file)
        self.refresh_now = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def configure(self, updated: set[str]) -> None:
        if "outpost_config" not in updated or self.settings is not None:
            return
        try:
            self.settings = Settings.from_env()
        except SystemExit as e:
            print(e, file=sys.stderr)
            os._exit(2)  # authentik's outpost: missing host or token is a usage error (exit code 2)
        if self.settings is not None:
            self.registry.ready = False  # /ping says 503 until the first providers arrive

    def running(self) -> None:
        if self.settings is not None:  # in the background: the listeners (readiness 503) come up meanwhile
            self.tasks = [asyncio.create_task(self.serve(Api(self.settings)))]

    async def serve(self, api: Api) -> None:
        await self.first_load(api)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.refresh_now.set)
        await asyncio.gather(self.refresh_loop(api), self.websocket_loop())

    def done(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def first_load(self, api: Api) -> None:
        """Retry until authentik answers; a refused token ends the outpost (nothing would ever work)."""
        while True:
            try:
                await self.refresh(api)
                return
            except InvalidToken as e:
                print(f"mitm-outpost: {e}. Check AUTHENTIK_TOKEN.", file=sys.stderr)
                os._exit(1)
            except config_schema.ConfigError as e:
                logger.error("authentik's providers cannot be served: %s; retrying in %.0f s", e, STARTUP_RETRY)
                await asyncio.sleep(STARTUP_RETRY)
            except Exception as e:
                logger.warning("authentik at %s is not reachable yet (%s); retrying in %.0f s",
                               api.settings.host, describe(e), STARTUP_RETRY)
                await asyncio.sleep(STARTUP_RETRY)

    async def refresh_loop(self, api: Api) -> None:
        backoff = STARTUP_RETRY
        while True:
            interval = int(self.outpost.get("refresh_interval_s") or REFRESH_DEFAULT)
            interval = REFRESH_DEFAULT if interval <= 0 else max(REFRESH_MIN, interval)
            try:
                await asyncio.wait_for(self.refresh_now.wait(), timeout=interval)
            except TimeoutError:
                pass
            self.refresh_now.clear()
            while True:
                try:
                    await self.refresh(api)
                    backoff = STARTUP_RETRY
                    break
                except Exception as e:
                    logger.warning("refresh from authentik failed (%s); keeping the last good providers, "
                                   "retrying in %.0f s", describe(e), backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(BACKOFF_MAX, backoff * 2)

    async def refresh(self, api: Api) -> None:
        outpost = await api.outpost()
        entries = await api.providers()
        name = str(outpost.get("name") or "authentik outpost")
        built: list[Provider] = []
        for entry in entries:
            try:
                built.append(await self.build(api, entry, outpost, name))
            except (config_schema.ConfigError, ValueError, KeyError, TypeError) as e:
                logger.error("authentik provider %r dropped: %s", entry.get("name"), e)
        self.outpost = outpost
        self.registry.outpost_uuid = str(outpost.get("pk") or "")
        self.registry.replace(name, tuple(built), source="authentik")
        self.registry.ready = True
        logger.info("authentik: serving %d provider(s): %s", len(built), ", ".join(p.name for p in built) or "none")

    async def build(self, api: Api, entry: dict[str, Any], outpost: dict[str, Any], outpost_name: str) -> Provider:
        values = {k: entry[k] for k in PROVIDER_FIELDS if entry.get(k) is not None}
        if isinstance(values.get("access_token_validity"), str):
            values["access_token_validity"] = float(values["access_token_validity"])
        oidc = dict(entry.get("oidc_configuration") or {})
        if self.settings and self.settings.host_browser:
            oidc = browser_facing(oidc, self.settings.host_browser)
        values["oidc_configuration"] = oidc
        values["issuer"] = oidc.get("issuer", "")
        if entry.get("certificate"):
            values["certificate"] = str(await self.certificate(api, str(entry["certificate"])))
        settings = config_schema.parse({"providers": [values]}).providers[0]
        idp = await asyncio.to_thread(IdentityProvider.from_settings, settings,
                                      not (self.settings and self.settings.insecure))
        return provider.build(settings, outpost_name, idp, release=self.registry.authentik_release)

    async def certificate(self, api: Api, pk: str) -> Path:
        """The key pair as a PEM file for the HTTPS listener, fetched again only when it changes."""
        meta = await api.get(f"crypto/certificatekeypairs/{pk}/")
        fingerprint = str(meta.get("fingerprint_sha256") or "")
        known = self.certificates.get(pk)
        if known and known[0] == fingerprint:
            return known[1]
        cert = (await api.get(f"crypto/certificatekeypairs/{pk}/view_certificate/"))["data"]
        key = (await api.get(f"crypto/certificatekeypairs/{pk}/view_private_key/"))["data"]
        path = Path(ctx.options.confdir).expanduser() / f"authentik-{pk}-{fingerprint[:16]}.pem"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key.strip() + "\n" + cert.strip() + "\n")
        path.chmod(0o600)
        self.certificates[pk] = (fingerprint, path)
        return path

    async def websocket_loop(self) -> None:
        """authentik's outpost channel: HELLO every 10 s, updates and session ends; reconnects."""
        assert self.settings is not None
        attempt, backoff = 0, 1.0
        while True:
            attempt += 1
            query = [*urllib.parse.parse_qsl(self.settings.query), ("instance_uuid", self.instance),
                     ("attempt", str(attempt))]
            url = f"{self.settings.websocket_base}ws/outpost/{self.outpost.get('pk')}/?" + urllib.parse.urlencode(query)
            context = None
            if url.startswith("wss:") and self.settings.insecure:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                async with websockets.connect(url,
                                              additional_headers={"Authorization": f"Bearer {self.settings.token}"},
                                              user_agent_header=USER_AGENT, ssl=context) as ws:
                    backoff = 1.0
                    logger.info("authentik: websocket connected")
                    await asyncio.gather(self.say_hello(ws), self.listen(ws))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("authentik: websocket lost (%s); reconnecting in %.0f s", describe(e), backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def say_hello(self, ws: Any) -> None:
        while True:
            await ws.send(json.dumps({"instruction": HELLO, "args": {
                "version": self.registry.authentik_release, "buildHash": "", "uuid": self.instance,
                "hostname": platform.node(), "golangVersion": IMPLEMENTATION, "opensslEnabled": False,
                "opensslVersion": ssl.OPENSSL_VERSION, "fipsEnabled": False, "outpostImplementation": IMPLEMENTATION}}))
            await asyncio.sleep(HELLO_INTERVAL)

    async def listen(self, ws: Any) -> None:
        async for raw in ws:
            try:
                message = json.loads(raw)
                instruction, args = message.get("instruction"), message.get("args") or {}
            except (json.JSONDecodeError, AttributeError):
                logger.warning("authentik: websocket message is not JSON; ignored")
                continue
            if instruction == TRIGGER_UPDATE:
                logger.info("authentik: update requested")
                await asyncio.sleep(random.random() * 0.5)
                self.refresh_now.set()
            elif instruction == SESSION_END and isinstance(args.get("session_id"), str):
                ended = await self.registry.store.delete_idp_session(args["session_id"])
                logger.info("authentik: session end: %d outpost session(s) ended", ended)


def describe(error: Exception) -> str:
    """One line for the log: the status of an HTTP error, else the exception's own first line."""
    if isinstance(error, httpx2.HTTPStatusError):
        return f"HTTP {error.response.status_code} from {error.request.url}"
    return (str(error).splitlines() or [type(error).__name__])[0]


def browser_facing(oidc: dict[str, Any], host_browser: str) -> dict[str, Any]:
    """AUTHENTIK_HOST_BROWSER: the browser-facing URLs (authorize, end session, issuer) use its
    scheme and host; back-channel URLs stay as the API gave them (spec §6.1)."""
    browser = urllib.parse.urlsplit(host_browser)
    rewritten = dict(oidc)
    for key in ("authorization_endpoint", "end_session_endpoint", "issuer"):
        if isinstance(oidc.get(key), str) and oidc[key]:
            parts = urllib.parse.urlsplit(oidc[key])
            rewritten[key] = urllib.parse.urlunsplit((browser.scheme, browser.netloc, parts.path, parts.query,
                                                      parts.fragment))
    return rewritten

