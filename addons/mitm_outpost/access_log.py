"""The AccessLog addon: one structured line per request, read from the decision record.

Never cookies, tokens, codes or query strings: the path is logged without its query and
the user as the `sub` (uid), never by e-mail or name.
"""

import json
import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from . import names
from .decision import METADATA_KEY, exchange_of, printable

access_logger = logging.getLogger("mitm_outpost.access")
FORMATS = ("auto", "json", "text", "off")
CLIENT_GONE = "Client disconnected."  # mitmproxy's message


class AccessLog:
    def __init__(self, interactive: bool = False) -> None:
        # mitmdump and mitmweb show every flow themselves (and pass each log line to all their
        # addons, which costs more than the line): there, `auto` is off; in the lean runner, json.
        self.auto = "off" if interactive else "json"
        self.style = self.auto  # the option's value, "auto" resolved (configure)

    def load(self, loader: Loader) -> None:
        loader.add_option("outpost_access_log", str, "auto",
                          "One line per request: json, text, off, or auto "
                          "(json in the lean runner, off in mitmdump/mitmweb).",
                          choices=FORMATS)

    def configure(self, updated: set[str]) -> None:
        # mitmproxy shows `choices` but does not enforce them: `--set outpost_access_log=xml` would pass.
        if "outpost_access_log" in updated and ctx.options.outpost_access_log not in FORMATS:
            raise exceptions.OptionsError(f"outpost_access_log: one of {', '.join(FORMATS)}, not "
                                          f"{ctx.options.outpost_access_log!r}")
        if "outpost_access_log" in updated:
            style = ctx.options.outpost_access_log
            self.style = self.auto if style == "auto" else style

    def response(self, flow: http.HTTPFlow) -> None:
        self.write(flow, flow.response.status_code if flow.response else 0)

    def error(self, flow: http.HTTPFlow) -> None:
        """The status the client really got: a streamed response's own, cut short; else none was sent."""
        if flow.response is not None and flow.response.stream:
            self.write(flow, flow.response.status_code, incomplete=True)
        else:  # 499 as nginx logs it: the client went away first
            self.write(flow, 499 if flow.error and flow.error.msg == CLIENT_GONE else 502)

    def write(self, flow: http.HTTPFlow, status: int, incomplete: bool = False) -> None:
        style = self.style
        if style == "off":
            return
        record = flow.metadata.get(METADATA_KEY) or {}
        request, response = flow.request, flow.response
        end = (response.timestamp_end if response and response.timestamp_end else None) or time.time()
        exchange = exchange_of(flow)
        if exchange is not None and exchange.forward is not None:
            host = exchange.forward[1].host or None  # a check: the host of the request it asks about
        elif record.get("outcome") in ("allowed", "skipped", "backend"):
            host = request.headers.get(names.FORWARDED_HOST)  # as Upstream sent it
        else:
            host = request.host_header
        line = {
            "time": round(time.time(), 3),
            "provider": record.get("provider", ""),
            "method": request.method,
            "host": host,
            "path": request.path.partition("?")[0][:2048],
            "status": status,
            "route": record.get("route", "outpost"),
            "decision": record.get("outcome", ""),
            "code": record.get("code", ""),
            "reason": record.get("reason", "")[:200],
            "uid": record.get("uid", ""),
            "duration_ms": round((end - request.timestamp_start) * 1000, 2),
        }
        if (response is not None and record.get("outcome") in ("allowed", "skipped")
                and response.timestamp_start and request.timestamp_end):
            line["upstream_ms"] = round((response.timestamp_start - request.timestamp_end) * 1000, 2)
        if incomplete:
            line["incomplete"] = True
        if lane := record.get("lane"):
            line["lane"] = lane  # answered by the production runner's fast lane, not through mitmproxy's layers
        if style == "json":
            access_logger.info(json.dumps(line, separators=(",", ":")))
        else:
            access_logger.info(" ".join(f"{k}={logfmt(str(v))}" for k, v in line.items()))


def logfmt(value: str) -> str:
    """A value of a text line: quoted when it holds a space, `"` or `=`, so that a client's string (a Host with
    ` status=200` in it) reads as one value and never as fields of its own."""
    text = printable(value, 2048)
    if not any(c in text for c in ' "='):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
