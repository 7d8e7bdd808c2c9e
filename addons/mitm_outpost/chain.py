"""The outpost's addons, in order, behind the one addon mitmproxy sees.

A request walks the chain top to bottom; the first addon that answers sets
`flow.response`, and every later one then steps aside.

mitmproxy visits every addon object, hook or not, for every event it dispatches: eight
per proxied request (four HTTP hooks, each followed by `update`). Registered one by one,
the fifteen addons below cost more CPU in that walk than in their own work (py-spy, see
BENCHMARKS.md). So mitmproxy sees a single `Chain`, which calls each addon's hooks from
lists made once.

On the request path it fails closed, unlike mitmproxy's rule of logging an exception and
calling the next addon (which, in a security pipeline, hands the request on): a step that
raises answers the request at once, 503 when the session store or the IdP failed (the step's
`failure_status`), 403 otherwise, and no later step sees that request. Hooks after the
decision (responses, errors: records and metrics) keep mitmproxy's rule, but for
`responseheaders`, where a failure replaces the upstream's answer with a 502.
"""

import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mitmproxy import exceptions, hooks, http, tls
from mitmproxy.addonmanager import Loader

from . import pages
from .access_log import AccessLog
from .authentik import AuthentikSource
from .debugging import Commands
from .decision import Outcome, decide, exchange_of, where
from .edge import Edge
from .embedded import Embedded
from .endpoints import Endpoints
from .fast_lane import FastLane
from .file_source import FileSource
from .gate import Gate
from .header_auth import HeaderAuth
from .lifecycle import Lifecycle
from .listeners import Listeners
from .metrics import Metrics
from .registry import Registry
from .routing import Routing
from .sanitize import Sanitize
from .session_check import SessionCheck, store_unavailable
from .sessions import StoreUnavailable
from .turns import Turns
from .upstream import Upstream
from .workers import Workers

logger = logging.getLogger("mitm_outpost")

# Every mitmproxy hook an addon of the chain may implement; Chain has a method for each. Those in
# SYNC must be plain functions: Chain then calls them without making a coroutine per event.
FORWARDED = ("load", "configure", "running", "done", "next_layer", "server_connect", "requestheaders", "request",
             "responseheaders", "response", "error", "tls_start_server")
SYNC = frozenset({"load", "configure", "done", "next_layer", "server_connect", "responseheaders", "response", "error",
                  "tls_start_server"})

FLOW_HOOKS = frozenset({"response", "error"})  # their failures are logged without a message (see `where`)

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
                awaits_nothing(hook, hook(*args))
            except (exceptions.AddonHalt, exceptions.OptionsError):
                raise  # e.g. a refused option change, as from any addon
            except Exception as e:
                if name in FLOW_HOOKS:
                    logger.error("addon error in %s (%s)", hook.__qualname__, where(e))
                else:
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

    def _walk(self, name: str, flow: http.HTTPFlow, start: int = 0) -> Coroutine[Any, Any, None] | None:
        """A request-path hook: the first step that raises answers the request, and the walk ends. Steps
        that answer at once are called at once; at the first that waits, the rest of the walk becomes
        the coroutine returned (None: the walk is done), so a request no step waits for costs no coroutine."""
        hooks = self.hooks[name]
        for index in range(start, len(hooks)):
            hook = hooks[index]
            try:
                pending = hook(flow)
            except exceptions.AddonHalt:
                raise
            except Exception as e:
                refuse_after_failure(flow, hook, e)
                return None
            if pending is not None:
                return self._walk_on(name, flow, index, pending)
        return None

    async def _walk_on(self, name: str, flow: http.HTTPFlow, index: int, pending: Awaitable[None]) -> None:
        try:
            await pending
        except exceptions.AddonHalt:
            raise
        except Exception as e:
            refuse_after_failure(flow, self.hooks[name][index], e)
            return
        if (rest := self._walk(name, flow, index + 1)) is not None:
            await rest

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if (pending := self._walk("requestheaders", flow)) is not None:
            return self._requestheaders_after(flow, pending)
        self._decided(flow)
        return None

    async def _requestheaders_after(self, flow: http.HTTPFlow, pending: Awaitable[None]) -> None:
        await pending
        self._decided(flow)

    @staticmethod
    def _decided(flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            # Answered by the outpost: no "100 Continue" first (the edge answers at once and discards
            # what is still coming).
            if "Expect" in flow.request.headers:  # a lookup, where pop() looks up and then walks the fields
                del flow.request.headers["Expect"]
        exchange = exchange_of(flow)
        if flow.response is not None or exchange is None or not exchange.proxied:
            flow.request.stream = False  # mitmproxy streams a large body upstream unless told: only after a verdict

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        return self._walk("request", flow)

    def next_layer(self, nextlayer: Any) -> None:
        self._call("next_layer", nextlayer)

    def server_connect(self, data: Any) -> None:
        self._call("server_connect", data)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        for hook in self.hooks["responseheaders"]:
            try:
                awaits_nothing(hook, hook(flow))
            except Exception as e:
                logger.error("addon error in %s (%s); the upstream's answer is replaced by a 502",
                             hook.__qualname__, where(e))
                flow.response = pages.page(502, "Bad gateway", "The outpost could not check the application's answer.")
                decide(flow, Outcome.DENIED, "step_failed", f"{hook.__qualname__} failed on the response",
                       logging.ERROR)
                return

    def response(self, flow: http.HTTPFlow) -> None:
        self._call("response", flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._call("error", flow)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        self._call("tls_start_server", tls_start)


def awaits_nothing(hook: Hook, result: object) -> None:
    """A hook the chain calls synchronously must be done when it returns: a coroutine it handed back would
    never run (the class check in Chain sees `async def` only, not a plain function returning one)."""
    if result is not None:
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{hook.__qualname__} returned {type(result).__name__}, but the chain awaits nothing here")


def refuse_after_failure(flow: http.HTTPFlow, hook: Hook, error: Exception) -> None:
    """Fail closed: the request is answered here, whatever an earlier step set, and logged without its query."""
    if isinstance(error, StoreUnavailable):
        store_unavailable(flow, error)
        return
    logger.error("addon error in %s (%s); the request is refused", hook.__qualname__, where(error))
    status = getattr(getattr(hook, "__self__", None), "failure_status", 403)
    if status == 503:
        flow.response = pages.page(503, "Service unavailable",
                                   "A service the outpost needs did not answer. Try again in a moment.")
        flow.response.headers["Retry-After"] = "5"
    else:
        flow.response = pages.page(403, "Forbidden", "The outpost could not decide about this request.")
    decide(flow, Outcome.DENIED, "step_failed", f"{hook.__qualname__} failed ({type(error).__name__}); refused",
           logging.ERROR)


def build(registry: Registry | None = None, interactive: bool = True, fast_lane: bool = False) -> Chain:
    """`interactive`: mitmdump/mitmweb/mitmproxy, with the debugging commands and views; the
    lean production runner builds the chain without them, and with `fast_lane` it serves the
    outpost's ports itself (fast_lane.py)."""
    registry = registry or Registry()
    debugging = [Commands(registry)] if interactive else []  # outpost.* commands, JWT and identity views
    lane = [FastLane()] if fast_lane else []
    outpost = Chain([*debugging,
        Edge(),  # the strict HTTP/1 server and its limits, in place of mitmproxy's lenient one
        *([] if interactive else [Workers()]),  # --workers N: refuses a memory store before FileSource reads it
        FileSource(registry),  # mitm_config.yaml -> providers; the session store
        AuthentikSource(registry),  # or/and providers from the authentik API (AUTHENTIK_HOST, AUTHENTIK_TOKEN)
        Embedded(registry),  # optional: the authentik server behind everything that is not the outpost's
        Listeners(registry, mitmproxy_listens=not fast_lane),  # ports 9000/9443, certificates
        Metrics(registry),  # port 9300: /metrics, /ping; request metrics
        Lifecycle(registry),  # SIGHUP reloads the configuration, SIGTERM drains
        AccessLog(interactive),  # one structured line per request
        Routing(registry),  # 1. provider by Host (or a trusted proxy's forwarded URL); health
        Sanitize(),  # 2. drop forged identity headers and outpost cookies
        Endpoints(registry),  # 3. start, callback, sign_out, back-channel logout
        SessionCheck(registry),  # 4. cookie -> session
        HeaderAuth(registry),  # 4b. or Authorization: Bearer/Basic -> session
        Gate(registry),  # 5-6. the verdict over the facts above: allow, skip, login, redirect or deny
        Turns(),  # answers without a session wait their turn: a flood of them cannot crowd out signed-in users
        Upstream(registry),  # 7-8. the last gate; backend, forwarding and identity headers
        # the production runner's listeners: forward-auth checks and endpoints answered without mitmproxy's layers
        *lane,
    ])
    for member in lane:
        member.chain = outpost
    return outpost
