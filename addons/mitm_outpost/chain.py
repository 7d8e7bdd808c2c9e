"""The outpost's addons, in order, behind the one addon mitmproxy sees.

A request walks the chain top to bottom; the first addon that answers sets
`flow.response`, and every later one then steps aside.

mitmproxy visits every addon object, hook or not, for every event it dispatches: eight
per proxied request (four HTTP hooks, each followed by `update`). Registered one by one,
the fifteen addons below cost more CPU in that walk than in their own work (py-spy, see
BENCHMARKS.md). So mitmproxy sees a single `Chain`, which calls each addon's hooks from
lists made once, with mitmproxy's own rule: an exception is logged and the next addon
runs (Upstream's last gate then refuses a request nobody decided on).
"""

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import exceptions, hooks, http, tls
from mitmproxy.addonmanager import Loader

from .access import Access
from .access_log import AccessLog
from .authentik import AuthentikSource
from .configuration import Configuration, Registry
from .debugging import Commands
from .endpoints import Endpoints
from .forward_auth import ForwardAuth
from .header_auth import HeaderAuth
from .lifecycle import Lifecycle
from .listeners import Listeners
from .metrics import Metrics
from .routing import Routing
from .sanitize import Sanitize
from .session_check import SessionCheck
from .upstream import Upstream

logger = logging.getLogger("mitm_outpost")

# Every mitmproxy hook an addon of the chain may implement; Chain has a method for each. Those in
# SYNC must be plain functions: Chain then calls them without making a coroutine per event.
FORWARDED = ("load", "configure", "running", "done", "requestheaders", "request", "responseheaders",
             "response", "error", "tls_start_server")
SYNC = frozenset({"load", "configure", "done", "responseheaders", "response", "error", "tls_start_server"})

Hook = Callable[..., Awaitable[None] | None]


class Chain:
    def __init__(self, addons: list[object]) -> None:
        self.members = tuple(addons)
        stray = {f"{type(a).__name__}.{name}" for a in addons for name in hooks.all_hooks
                 if name not in FORWARDED and callable(getattr(a, name, None))}
        if stray:
            raise TypeError(f"hooks the chain does not forward: {', '.join(sorted(stray))}")
        awaiting = {f"{type(a).__name__}.{name}" for a in addons for name in SYNC
                    if inspect.iscoroutinefunction(getattr(a, name, None))}
        if awaiting:
            raise TypeError(f"hooks the chain calls synchronously, made async: {', '.join(sorted(awaiting))}")
        self.hooks: dict[str, tuple[Hook, ...]] = {
            name: tuple(getattr(a, name) for a in addons if callable(getattr(a, name, None))) for name in FORWARDED
        }

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks[name]:
            try:
                hook(*args)
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise  # e.g. a refused option change, as from any addon
            except Exception:
                logger.exception("addon error in %s", hook.__qualname__)

    async def _run(self, name: str, *args: Any) -> None:
        for hook in self.hooks[name]:
            try:
                pending = hook(*args)
                if pending is not None:
                    await pending
            except exceptions.AddonHalt:
                raise
            except Exception:
                logger.exception("addon error in %s", hook.__qualname__)

    def load(self, loader: Loader) -> None:
        for addon in self.members:  # what mitmproxy does for each addon it registers itself
            loader.master.commands.collect_commands(addon)
        self._call("load", loader)

    def configure(self, updated: set[str]) -> None:
        self._call("configure", updated)

    async def running(self) -> None:
        await self._run("running")

    def done(self) -> None:
        self._call("done")

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await self._run("requestheaders", flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        await self._run("request", flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._call("responseheaders", flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._call("response", flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._call("error", flow)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        self._call("tls_start_server", tls_start)


def build(registry: Registry | None = None, interactive: bool = True) -> Chain:
    """`interactive`: mitmdump/mitmweb/mitmproxy, with the debugging commands and views; the
    lean production runner builds the chain without them."""
    registry = registry or Registry()
    debugging = [Commands(registry)] if interactive else []  # outpost.* commands, JWT and identity views
    return Chain([*debugging,
        Configuration(registry),  # mitm_config.yaml -> providers; the session store
        AuthentikSource(registry),  # or/and providers from the authentik API (AUTHENTIK_HOST, AUTHENTIK_TOKEN)
        Listeners(registry),  # ports 9000/9443, certificates
        Metrics(registry),  # port 9300: /metrics, /ping; request metrics
        Lifecycle(registry),  # SIGHUP reloads the configuration, SIGTERM drains
        AccessLog(interactive),  # one structured line per request
        Routing(registry),  # 1. provider by Host (or a trusted proxy's forwarded URL); health
        Sanitize(),  # 2. drop forged identity headers and outpost cookies
        Endpoints(registry),  # 3. start, callback, sign_out, back-channel logout
        SessionCheck(registry),  # 4. cookie -> session
        HeaderAuth(registry),  # 4b. or Authorization: Bearer/Basic -> session
        ForwardAuth(registry),  # forward auth answers here (2xx, 401 or 302)
        Access(),  # 5-6. unauthenticated paths, login redirect or 401
        Upstream(registry),  # 7-8. backend, forwarding and identity headers
    ])
