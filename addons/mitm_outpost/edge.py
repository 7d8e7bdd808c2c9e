"""The Edge addon: the outpost's own HTTP/1 server in front of every decision, in every runner.

When mitmproxy picks the HTTP layer (the `next_layer` hook), the Edge swaps in the strict
layers of `strict_http` (limits, grammar, timeouts: `edge_rules`); a stack it cannot make
strict is closed, never served by mitmproxy's lenient layers. It owns the edge's options
(`outpost_max_*`, `outpost_*_timeout`) and bounds the upstream connect time.

Raw TCP relays (`rawtcp`) stay off: only WebSocket upgrades, after the access decision, switch
protocols.
"""

import asyncio
import logging

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import Server
from mitmproxy.proxy import context as context_module
from mitmproxy.proxy import layer, server_hooks
from mitmproxy.proxy.layers import http as http_layers

from .edge_rules import Limits
from .strict_http import CONNECT_TIMEOUT, Closing, StrictHttpLayer

logger = logging.getLogger("mitm_outpost")
# option name -> (Limits field, help)
OPTIONS = {
    "outpost_max_request_line": ("request_line", "Longest request line (method, URL, version) in bytes; "
                                                 "longer gets 414."),
    "outpost_max_header_size": ("header_size", "Largest request head (request line and all fields) in bytes; "
                                               "larger gets 431."),
    "outpost_max_header_count": ("header_count", "Most header fields in a request; more gets 431."),
    "outpost_header_timeout": ("header_timeout", "Seconds a client has to send a complete request head; "
                                                 "then 408 and a close."),
    "outpost_upstream_connect_timeout": ("upstream_connect_timeout", "Seconds to connect to an upstream; then 504."),
    "outpost_upstream_timeout": ("upstream_timeout",
                                 "Seconds an upstream has to start its response once the request is sent; then 504."),
}


class Edge:
    def __init__(self) -> None:
        self.limits = Limits()

    def load(self, loader: Loader) -> None:
        for option, (field, help_text) in OPTIONS.items():
            default = getattr(self.limits, field)
            loader.add_option(option, type(default), default, help_text)

    def configure(self, updated: set[str]) -> None:
        if "rawtcp" in updated and ctx.options.rawtcp:
            # mitmproxy's default; a 101 to anything but a WebSocket would become an unchecked TCP relay.
            ctx.options.update(rawtcp=False)
        if not updated & OPTIONS.keys():
            return
        limits = Limits(**{field: getattr(ctx.options, option) for option, (field, _) in OPTIONS.items()})
        if min(limits.request_line, limits.header_count) < 1 or limits.header_size < limits.request_line:
            raise exceptions.OptionsError("outpost_max_*: each limit must be positive, "
                                          "and the header size at least the request line")
        if min(limits.header_timeout, limits.upstream_connect_timeout, limits.upstream_timeout) <= 0:
            raise exceptions.OptionsError("outpost_*_timeout: each timeout must be a positive number of seconds")
        self.limits = limits

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """mitmproxy's own choice of layer, with our HTTP layer in place of its own; if that
        fails, the connection is closed rather than served by the lenient one."""
        try:
            if nextlayer.layer is None and (chooser := ctx.master.addons.get("nextlayer")) is not None:
                chooser.next_layer(nextlayer)
            nextlayer.layer = self.strict(nextlayer.layer, nextlayer.context)
        except Exception:
            logger.exception("edge: no HTTP layer could be chosen; closing the connection")
            nextlayer.layer = Closing(nextlayer.context)

    def strict(self, chosen: layer.Layer | None, context: context_module.Context) -> layer.Layer | None:
        """The chosen stack (on 9443: client TLS, then HTTP) with our HTTP layer wherever mitmproxy's
        stands; a stack that ends in anything but HTTP (a raw TCP relay, say) is closed instead."""
        parent, current = None, chosen
        while current is not None:
            if type(current) is http_layers.HttpLayer:
                current.context.layers.remove(current)  # a layer registers itself in its context when made
                strict = StrictHttpLayer(current.context, current.mode, self.limits)
                if parent is None:
                    chosen = strict
                else:
                    parent.child_layer = strict
                return chosen
            if isinstance(current, (StrictHttpLayer, layer.NextLayer)):
                return chosen
            parent, current = current, getattr(current, "child_layer", None)
        if chosen is None:
            return None  # mitmproxy waits for more data to decide
        logger.warning("edge: refused a connection that would not be HTTP (%s)", type(chosen).__name__)
        return Closing(context)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """mitmproxy waits for a TCP connect as long as the OS does; we wait outpost_upstream_connect_timeout."""
        task = asyncio.current_task()
        if task is not None:
            timeout = self.limits.upstream_connect_timeout
            asyncio.get_running_loop().call_later(timeout, _connect_overdue, task, data.server, timeout)


def _connect_overdue(task: asyncio.Task[None], server: Server, timeout: float) -> None:
    if task.done() or server.timestamp_tcp_setup is not None or server.error is not None:
        return
    if server.timestamp_start is None:  # still queued for one of mitmproxy's connection slots: not our clock yet
        asyncio.get_running_loop().call_later(timeout, _connect_overdue, task, server, timeout)
        return
    task.cancel(CONNECT_TIMEOUT)
