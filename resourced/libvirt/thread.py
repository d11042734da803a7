"""The process's libvirt thread: libvirt's event loop, and every call into libvirt.

libvirt's calls block (opening a remote URI can take seconds), and `libvirtaio`,
its asyncio event loop, is not thread-safe: a libvirt call made on another
thread changes the loop's readers from that thread. So one daemon thread runs an
asyncio loop with `libvirtaio` registered on it, and every libvirt call, event
callback and stream operation of the process happens there. The service's own
loop hands work over with `call()` (awaitable) or `post()` (fire and forget) and
gets callbacks back with `call_soon_threadsafe`; a slow libvirt call delays
only libvirt, never a console behind a gateway or a D-Bus caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def libvirt_loop() -> asyncio.AbstractEventLoop:
    """The libvirt thread's loop (the thread is started, and libvirtaio registered, once)."""
    global _loop
    with _lock:
        if _loop is None:
            import libvirtaio

            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="libvirt", daemon=True).start()
            ready.wait()
            _loop = loop
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
