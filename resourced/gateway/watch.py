"""Following a libvirt domain through libvirt's events, so the gateway keeps up with it.

A `DomainWatcher` holds a connection to libvirt with domain events registered:
lifecycle (started, stopped, ...) and device added or removed, for the one
domain it follows. After each burst of events it calls the gateway's `on_change`,
which re-reads the domain's XML: a restarted domain has new PTY paths and a new
VNC socket or port, and a hot-plugged channel is a new console. If libvirtd goes
away it reconnects, and then calls `on_change` too, since anything may have
changed meanwhile.

libvirt's calls block (opening a remote URI can take seconds), so the watcher
runs them, and libvirt's event loop (`resourced.libvirt.events`), on an asyncio
loop in a thread of its own; only `on_change` runs on the gateway's loop. It knows nothing
of consoles or RFB.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from resourced.errors import NotConnected, ResourcedError
from resourced.gateway.libvirt import (
    DomainResources,
    LibvirtError,
    _find_domain,
    _libvirt,
    _message,
    lookup_domain,
)
from resourced.libvirt import thread
from resourced.libvirt.thread import libvirt_loop

log = logging.getLogger(__name__)

#: Seconds between attempts to reach libvirt again.
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Events come in bursts (defined, started, resumed...): wait this long (seconds)
#: after the last one before looking at the domain again.
SETTLE = 0.2
#: Keepalive for remote URIs: a probe every 5 s, the connection given up after 3
#: unanswered ones.
KEEPALIVE = (5, 3)


class DomainWatcher:
    """Calls `on_change(resources)` on the caller's loop with the domain's resources
    (re-read through libvirt) whenever domain `name` may have changed."""

    def __init__(
        self, uri: str, name: str, on_change: Callable[[DomainResources], Awaitable[None]]
    ) -> None:
        self.uri = uri
        self.name = name
        self._on_change = on_change
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._follow_future: concurrent.futures.Future[None] | None = None
        self._task: asyncio.Future[None] | None = None
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._lost: asyncio.Future[None] | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._again = False

    # --- on the gateway's loop ------------------------------------------------------

    def start(self) -> None:
        """Start following. From now on this process's libvirt calls must go through
        `lookup()`: libvirt's event loop lives in the watcher's thread."""
        self._main_loop = asyncio.get_running_loop()
        self._loop = libvirt_loop()
        self._follow_future = asyncio.run_coroutine_threadsafe(self._follow(), self._loop)
        self._task = asyncio.wrap_future(self._follow_future)

    async def lookup(self) -> DomainResources:
        """The domain's resources now (`lookup_domain`, run in the watcher's thread)."""
        assert self._loop is not None
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._lookup(), self._loop)
        )

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._follow_future is not None and self._task is not None:
            self._follow_future.cancel()  # cancels _follow in the watcher's loop
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running

    @property
    def conn(self) -> Any:
        """The current libvirt connection (None while libvirtd is away); use it only
        on the libvirt thread (`resourced.libvirt.thread`)."""
        return self._conn

    async def domain(self) -> Any:
        """The followed domain's current libvirt object (`NotConnected` if there is
        none now), for calls made on the libvirt thread."""
        conn = self._conn
        if conn is None:
            raise NotConnected(f"libvirt at {self.uri} is not connected")
        try:
            return await thread.call(_find_domain, _libvirt(), conn, self.uri, self.name)
        except ResourcedError as err:
            raise NotConnected(str(err)) from None

    def refresh(self) -> None:
        """Look at the domain again now (SIGHUP), in turn with the events."""
        self._changed()

    def _changed(self) -> None:
        """Debounce: one `on_change` per burst, and never two at once."""
        if self._pending is not None:
            self._pending.cancel()
        assert self._main_loop is not None
        self._pending = self._main_loop.call_later(SETTLE, self._run_change)

    def _run_change(self) -> None:
        self._pending = None
        if self._running is not None and not self._running.done():
            self._again = True  # what changed meanwhile is looked at right after
            return
        assert self._main_loop is not None
        self._running = self._main_loop.create_task(self._change())

    async def _change(self) -> None:
        while True:
            self._again = False
            try:
                resources = await self.lookup()
            except ResourcedError as err:
                log.info(
                    "gateway: domain %s not usable now (%s); keeping what we have", self.name, err
                )
            else:
                await self._deliver(resources)
            if not self._again:
                return

    async def _deliver(self, resources: DomainResources) -> None:
        try:
            await self._on_change(resources)
        except Exception:  # the next event tries again; the gateway carries on
            log.exception("gateway: following domain %s failed", self.name)

    # --- on the libvirt events loop ---------------------------------------------

    async def _lookup(self) -> DomainResources:
        # Blocks this loop only (the gateway's carries on); the open connection
        # is reused when there is one.
        return lookup_domain(self.uri, self.name, conn=self._conn)

    async def _follow(self) -> None:
        attempt = 0
        first = True
        try:
            while True:
                try:
                    self._connect()
                except LibvirtError as err:
                    delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                    if attempt == 0:
                        log.warning("gateway: %s; trying again in %g s", err, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                log.info("gateway: following domain %s through libvirt events", self.name)
                if not first or attempt:
                    self._post_change()  # it may have changed while we were away
                first, attempt = False, 0
                assert self._lost is not None
                await self._lost
                log.warning("gateway: lost the connection to libvirt at %s", self.uri)
                self._disconnect()
        finally:
            self._disconnect()

    def _connect(self) -> None:
        libvirt = _libvirt()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as error:
            raise LibvirtError(
                f"cannot connect to libvirt at {self.uri}: {_message(error)}"
            ) from None
        self._lost = asyncio.get_running_loop().create_future()
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(*KEEPALIVE)  # local URIs do not support it: that is fine
        try:
            conn.registerCloseCallback(self._on_close, None)
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device),
            ):
                # All domains, filtered by name here: the domain may not exist yet,
                # or be destroyed and created again as another object.
                self._callbacks.append(conn.domainEventRegisterAny(None, event_id, callback, None))
        except libvirt.libvirtError as error:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            self._callbacks.clear()
            raise LibvirtError(
                f"cannot register for events at {self.uri}: {_message(error)}"
            ) from None
        self._conn = conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        libvirt = _libvirt()
        for callback_id in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callbacks.clear()
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _ours(self, domain: Any) -> bool:
        with contextlib.suppress(Exception):
            return bool(domain.name() == self.name or domain.UUIDString() == self.name)
        return False

    def _on_lifecycle(self, _conn: Any, domain: Any, event: int, detail: int, _opaque: Any) -> None:
        if self._ours(domain):
            log.debug("gateway: domain %s lifecycle event %d/%d", self.name, event, detail)
            self._post_change()

    def _on_device(self, _conn: Any, domain: Any, alias: str, _opaque: Any) -> None:
        if self._ours(domain):
            log.debug("gateway: domain %s device %s added or removed", self.name, alias)
            self._post_change()

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _post_change(self) -> None:
        assert self._main_loop is not None
        self._main_loop.call_soon_threadsafe(self._changed)
