"""The production runner's Master: mitmproxy's, without the per-event work a fixed set of addons never needs.

mitmproxy finds each event's handlers anew every time: it walks every addon and its children,
asks each for the hook by name, and enters a `safecall` per addon, whether it has the hook
or not; the event's arguments are rebuilt from its dataclass fields for every handler. A
proxied request raises eight events (four hooks, each followed by `update`, which none of
the runner's addons has): about 40 µs of CPU a request. `HookTable` makes each event's list
of handlers once, and again whenever an addon is added or removed, and calls them exactly
as mitmproxy does: in order, each top-level addon under its own `safecall`, `AddonHalt`
ending the event. (The discouraged synchronous `trigger`, off the request path, stays mitmproxy's.)

mitmproxy also type-checks every field of every message it makes, in a `__post_init__` that
exists only `if __debug__` (python -O drops it): about 30 µs a proxied request for the
request and the response it parses itself. `drop_message_type_checks` removes that one
debug check, and nothing else that -O would (asserts stay). Under mitmdump and mitmweb
neither applies.
"""

import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, http
from mitmproxy.addonmanager import safecall, traverse

Handlers = tuple[tuple[Callable[..., Any], ...], ...]  # per top-level addon, its and its children's handlers

_argument_names: dict[type[hooks.Hook], tuple[str, ...]] = {}


def arguments(event: hooks.Hook) -> list[Any]:
    """`event.args()`, from field names looked up once per hook class."""
    names = _argument_names.get(type(event))
    if names is None:
        names = _argument_names[type(event)] = tuple(f.name for f in fields(event))  # type: ignore[arg-type]
    return [getattr(event, name) for name in names]


class HookTable(addonmanager.AddonManager):
    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._handlers: dict[str, Handlers] = {}

    def handlers(self, name: str) -> Handlers:
        found = self._handlers.get(name)
        if found is None:
            per_addon = (tuple(f for a in traverse([addon]) if callable(f := getattr(a, name, None)))
                         for addon in self.chain)
            found = self._handlers[name] = tuple(funcs for funcs in per_addon if funcs)
        return found

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._handlers.clear()

    def register(self, addon: Any) -> Any:  # also how an addon adds children while running
        registered = super().register(addon)
        self._handlers.clear()
        return registered

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)
        finally:  # even when it fails halfway, the table is made again from what is left
            self._handlers.clear()

    def clear(self) -> None:
        try:
            super().clear()
        finally:
            self._handlers.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self.handlers(event.name)
        if not handlers:
            return
        args = arguments(event)
        for funcs in handlers:
            try:
                with safecall():
                    for func in funcs:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self.handlers(hooks.UpdateHook.name):  # none of the runner's addons has one
            message = arguments(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def _unchecked(self: http.MessageData) -> None:
    """The messages are mitmproxy's own parses, or ours made with pages.unchecked."""


def drop_message_type_checks() -> None:
    if getattr(http.MessageData, "__post_init__", None) is not None:  # None already under python -O
        http.MessageData.__post_init__ = _unchecked  # type: ignore[attr-defined]

