"""The lean production runner: `python -m mitm_outpost [--set name=value ...]`.

The same options, configuration and chain as `mitmdump -s addons/outpost.py`, on a mitmproxy
Master that loads only what an outpost needs (proxy server, next layer, TLS, error check)
instead of mitmdump's ~35 default addons, each of which is called for every event of every
request, and dispatches events from a table of handlers (lean_master.py). Logs go to stderr,
one line each. The event loop is uvloop's (`--loop asyncio` for the standard library's): the
loop's own work is a third of a forward-auth check's CPU on asyncio's.
"""

import argparse
import asyncio
import contextvars
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop
from mitmproxy import exceptions, hooks, options
from mitmproxy.addons import errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from . import __version__, chain, supervisor, workers
from .lean_master import HookTable, drop_message_type_checks


class UvLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop, handing a task factory what asyncio's loop hands it: mitmproxy's Master installs
    asyncio.eager_task_factory, which takes no `eager_start` (uvloop 0.23 passes one) and which anyio
    (httpx2) recognises, to give its own tasks a lazy start."""

    def create_task(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        factory = self.get_task_factory()
        if factory is None:
            return super().create_task(coro, name=name, context=context)
        task = factory(self, coro) if context is None else factory(self, coro, context=context)
        if name is not None:
            task.set_name(name)
        return task


LOOPS = {"uvloop": UvLoop, "asyncio": asyncio.new_event_loop}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mitm_outpost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="setoptions", action="append", default=[], metavar="NAME=VALUE",
                        help="set an option, as with mitmdump (e.g. outpost_config=/etc/outpost.yaml)")
    parser.add_argument("--workers", metavar="N", help="worker processes serving the same ports: a number, or auto "
                        "(one per core); the option outpost_workers. More than 1 needs session_store: redis://...")
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="the event loop (default: uvloop)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--version", action="version", version=f"mitm-outpost {__version__}")
    args = parser.parse_args(argv)
    if args.workers is not None:
        args.setoptions.append(f"outpost_workers={args.workers}")
    return args


async def run(args: argparse.Namespace) -> int:
    opts = options.Options()
    master = Master(opts)
    master.addons = HookTable(master)  # before any addon: one table of handlers per event (lean_master.py)
    drop_message_type_checks()
    check = errorcheck.ErrorCheck(repeat_errors_on_stderr=True)
    outpost = chain.build(interactive=False, fast_lane=True)
    # mitmdump's order: the outpost's tls_start_server sees a server connection before TlsConfig.
    master.addons.add(proxyserver.Proxyserver(), outpost, next_layer.NextLayer(), tlsconfig.TlsConfig(), check)
    try:
        opts.set(*args.setoptions)
        # Our addons see every other option once too, defaults included, as mitmdump's script
        # loader shows them: Configuration, for one, acts on defaults (trusted_proxies) only there.
        given = {setting.partition("=")[0] for setting in args.setoptions}
        master.addons.invoke_addon_sync(outpost, hooks.ConfigureHook(set(opts.keys()) - given))
        opts.update(connection_strategy="lazy")
    except exceptions.OptionsError as e:
        print(f"mitm_outpost: {e}", file=sys.stderr)
        return 2
    await master.run()
    return 1 if check.logger.has_errored else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    try:
        opts = supervisor.options(args.setoptions)
        count = workers.count(opts.outpost_workers)
    except exceptions.OptionsError as e:
        print(f"mitm_outpost: {e}", file=sys.stderr)
        sys.exit(2)
    # With workers, every line says which process wrote it.
    process = "[%(process)d] " if count > 1 else ""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {process}%(name)s %(message)s")
    for noisy in ("hpack", "asyncio", "mitmproxy.proxy.server", "mitmproxy.addons.proxyserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if count > 1 and not workers.is_worker():
        sys.exit(supervisor.supervise(argv, opts, count, args.setoptions))
    # Until Lifecycle takes SIGHUP over (at the first configure), a reload signal must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(asyncio.run(run(args), loop_factory=LOOPS[args.loop]))


if __name__ == "__main__":
    main()
