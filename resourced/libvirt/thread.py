"""The process's libvirt thread, for every blocking libvirt call, and where libvirt's
events run.

libvirt's calls block (opening a remote URI can take seconds), so one daemon
thread runs an asyncio loop that makes them: the service's own loop hands work
over with `call()` (awaitable) or `post()` (fire and forget) and gets callbacks
back with `call_soon_threadsafe`; a slow libvirt call delays only libvirt, never
a console behind a gateway or a D-Bus caller.

libvirt's event loop (`resourced.libvirt.events`: its connections' sockets,
timers and stream callbacks) runs on one asyncio loop of the process, chosen
once: the libvirt thread's by default, or another loop given to
`run_events_on()` before the first libvirt call (the service gives its own, so
that a console stream's non-blocking `send`/`recv` and its events need no
thread hop; see `resourced.libvirt.stream`). Such non-blocking calls are the
only libvirt calls made off the libvirt thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from resourced.libvirt.events import LibvirtEvents

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_events: LibvirtEvents | None = None
_lock = threading.Lock()


def run_events_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Run libvirt's events on `loop` if no loop was chosen yet; whether they do.

    `loop` must run as long as the process uses libvirt.
    """
    global _events
    with _lock:
        if _events is None:
            import libvirt

            _events = LibvirtEvents(libvirt, loop)
            _events.register()
        return _events.loop is loop


def events_loop() -> asyncio.AbstractEventLoop:
    """The loop libvirt's events run on (the libvirt thread's unless chosen before)."""
    libvirt_loop()
    assert _events is not None
    return _events.loop


def libvirt_loop() -> asyncio.AbstractEventLoop:
    """The libvirt thread's loop (the thread is started once, and libvirt's events
    registered on it unless `run_events_on()` chose another loop)."""
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="libvirt", daemon=True).start()
            ready.wait()
            _loop = loop
    run_events_on(_loop)
    return _loop


async def call(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the libvirt thread; its result (or exception) here."""

    async def on_libvirt_thread() -> T:
        return function(*args)

    future = asyncio.run_coroutine_threadsafe(on_libvirt_thread(), libvirt_loop())
    return await asyncio.wrap_future(future)


def post(function: Callable[..., Any], *args: Any) -> None:
    """`function(*args)` on the libvirt thread, soon; nothing waits for it."""
    libvirt_loop().call_soon_threadsafe(function, *args)
