"""The Turns addon: requests without a session that the outpost answers itself take turns.

The outpost is one event loop, and a signed-in request waits behind every request the loop is
working on. A client that floods `/start`, or any URL that answers with a login redirect, keeps
as many requests in work as it has connections, and a signed-in user's request then waits
behind all of them (BENCHMARKS.md: 17x its p99 alone, with 16 flooding connections).

So at most `outpost_anonymous_turns` such answers are in work at once; the others wait, in
arrival order, before their answer is sent, and their connection sends nothing more meanwhile.
A closed-loop flood then keeps that many requests in work, not one per connection, and its
throughput stays what the loop can do. Requests with a session (proxied, or a forward-auth
check that passes) never wait here, nor do health checks. A turn ends when the answer goes out
(the `response` or `error` hook) or, whatever happens to the flow, after `TURN_DEADLINE` seconds.

This is for requests mitmproxy serves. The production runner's fast lane answers within one
step, so its answers never wait here; it bounds its own work per loop iteration instead
(`fast_lane.FastLane.run`).
"""

import asyncio
import collections
import logging
import weakref

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from . import names
from .decision import METADATA_KEY, exchange_of, note

logger = logging.getLogger("mitm_outpost")

TURN_DEADLINE = 5.0  # seconds a turn may be held before it is handed on anyway


class Turn:
    __slots__ = ("turns", "timer")

    def __init__(self, turns: "Turns") -> None:
        self.turns = turns
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(TURN_DEADLINE, self.end)

    def end(self) -> None:
        if self.timer is None:
            return  # ended already
        self.timer.cancel()
        self.timer = None
        self.turns.hand_on()


class Turns:
    def __init__(self) -> None:
        self.limit = 0
        self.in_work = 0
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.held: "weakref.WeakKeyDictionary[http.HTTPFlow, Turn]" = weakref.WeakKeyDictionary()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "outpost_anonymous_turns", int, 1,
            "How many requests without a session the outpost answers at once (login redirects, /start, "
            "callbacks, denials, health); more wait their turn, so a flood of them cannot crowd out "
            "signed-in users. 0: no limit.")

    def configure(self, updated: set[str]) -> None:
        if ctx.options.outpost_anonymous_turns < 0:
            raise exceptions.OptionsError("outpost_anonymous_turns: 0 (no limit) or more")
        self.limit = ctx.options.outpost_anonymous_turns
        while self.waiting and (not self.limit or self.in_work < self.limit):
            waiter = self.waiting.popleft()
            if not waiter.done():
                self.in_work += 1
                waiter.set_result(None)

    def requestheaders(self, flow: http.HTTPFlow):  # type: ignore[no-untyped-def]
        return self._take_if_anonymous(flow)

    def request(self, flow: http.HTTPFlow):  # type: ignore[no-untyped-def]
        return self._take_if_anonymous(flow)  # an endpoint that read the body answers here

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def _take_if_anonymous(self, flow: http.HTTPFlow):  # type: ignore[no-untyped-def]
        if not self.limit or flow.response is None or flow in self.held:
            return None
        exchange = exchange_of(flow)
        if exchange is not None and exchange.session is not None:
            return None
        if flow.metadata.get(METADATA_KEY, {}).get("code") in names.HEALTH:
            return None  # a load balancer's health check says how the outpost is, not how long a flood's queue is
        if self.in_work < self.limit:
            self.in_work += 1
            self.held[flow] = Turn(self)
            return None
        return self._wait(flow)

    async def _wait(self, flow: http.HTTPFlow) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        queued = len(self.waiting)
        try:
            await waiter  # hand_on counted this request in `in_work`
        except asyncio.CancelledError:
            if not waiter.cancelled():  # woken and cancelled in the same tick: the turn was ours
                self.hand_on()
            raise
        self.held[flow] = Turn(self)
        note(flow, turn=f"waited behind {queued - 1} answer(s) without a session")

    def _end(self, flow: http.HTTPFlow) -> None:
        turn = self.held.pop(flow, None)
        if turn is not None:
            turn.end()

    def hand_on(self) -> None:
        while self.waiting and (not self.limit or self.in_work <= self.limit):
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the turn passes on: `in_work` stays
                return
        self.in_work -= 1
