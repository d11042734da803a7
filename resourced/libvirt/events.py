"""libvirt's event loop on an asyncio loop, usable from any thread.

libvirt's client library needs an event loop of the program's for its
connections' sockets, keepalive timers and stream events
(`virEventRegisterImpl`). `LibvirtEvents` is that loop on one asyncio loop:
registrations and changes may come from any thread (libvirt makes them from
whichever thread calls into it, and a blocking call on the libvirt thread turns
its connection's socket watch off and on again while a stream is used on the
service's loop), and are applied on the asyncio loop; the callbacks libvirt
gave run there too.

What it does differently from `libvirtaio` (libvirt-python's own, which may be
called only on its loop's thread), for the console stream's sake:

- A change to a socket watch is applied once per loop iteration, and only if
  the watched events differ from what the loop watches; fewer events are taken
  off only when an unwanted one comes. libvirt turns a socket's watch off and on
  around every call it makes (every `virStreamSend`), which then costs nothing
  but the two calls.
- A timer is a `call_soon`/`call_later` handle, not a task; and a zero timeout
  set while a socket's callback runs fires as soon as that callback returns:
  libvirt signals a stream event that way, so that is the receive path's
  latency.
- A periodic timer set again before it is due (libvirt restarts a connection's
  keepalive timer on every message in or out) only moves its due time: the
  loop's handle stays, and when it fires early it is armed again for the new
  time. A cancelled handle and a new one per message would cost more than the
  message.

It is not a general event loop: it does no I/O of its own and never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: libvirt's `virEventHandleType` bits the loop can watch (ERROR and HANGUP come
#: with READABLE, as epoll reports them).
READABLE = 1
WRITABLE = 2

#: How early (seconds) a periodic timer may fire: libvirt's timers count in ms.
_EARLY = 0.001

HandleCallback = Callable[[int, int, int, Any], None]
TimeoutCallback = Callable[[int, Any], None]


class _Watch:
    __slots__ = ("callback", "events", "fd", "id", "opaque")

    def __init__(self, id: int, fd: int, events: int, callback: HandleCallback, opaque: Any):
        self.id = id
        self.fd = fd
        self.events = events
        self.callback = callback
        self.opaque = opaque


class _Soon:
    """A zero timeout made due while a socket's callback runs: fired when it returns."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Timer:
    __slots__ = ("callback", "due", "handle", "id", "opaque", "removed", "timeout")

    def __init__(self, id: int, timeout: int, callback: TimeoutCallback, opaque: Any):
        self.id = id
        self.timeout = timeout  # ms: -1 off, 0 every loop iteration, else a period
        self.callback = callback
        self.opaque = opaque
        # The loop's thread only:
        self.handle: asyncio.Handle | _Soon | None = None
        #: When a periodic timer is due (loop time); `handle` may fire before it.
        self.due = 0.0
        self.removed = False


class LibvirtEvents:
    """libvirt's event loop implementation on `loop` (see the module docstring)."""

    def __init__(self, libvirt: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._libvirt = libvirt
        self.loop = loop
        self._thread: int | None = None  # the loop's thread, once known
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._watches: dict[int, _Watch] = {}
        self._by_fd: dict[int, dict[int, _Watch]] = {}
        self._dirty: set[int] = set()  # fds whose watch on the loop may be out of date
        self._reset: set[int] = set()  # fds whose every watch went (the number may be reused)
        self._sync_due = False
        self._timers: dict[int, _Timer] = {}
        # The loop's thread only:
        self._watched: dict[int, int] = {}  # fd -> READABLE|WRITABLE the loop watches
        #: Zero timeouts made due during `_dispatch`, and their marks.
        self._soon: list[tuple[_Timer, _Soon]] | None = None
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                self._thread = threading.get_ident()
        if self._thread is None:
            self._post(self._learn_thread)

    def register(self) -> None:
        """Make this libvirt's event loop implementation (for the whole process)."""
        self._libvirt.virEventRegisterImpl(
            self.add_handle,
            self.update_handle,
            self.remove_handle,
            self.add_timeout,
            self.update_timeout,
            self.remove_timeout,
        )

    def _learn_thread(self) -> None:
        self._thread = threading.get_ident()

    def _post(self, function: Callable[..., Any], *args: Any) -> None:
        """`function(*args)` on the loop, soon (never now: libvirt holds locks)."""
        try:
            if threading.get_ident() == self._thread:
                self.loop.call_soon(function, *args)
            else:
                self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: the process is ending
            pass

    def _free(self, opaque: Any) -> None:
        self._libvirt.virEventInvokeFreeCallback(opaque)

    # --- file descriptors ------------------------------------------------------------

    def add_handle(self, fd: int, events: int, callback: HandleCallback, opaque: Any) -> int:
        watch = _Watch(next(self._ids), fd, events, callback, opaque)
        with self._lock:
            self._watches[watch.id] = watch
            self._by_fd.setdefault(fd, {})[watch.id] = watch
        self._changed(fd)
        return watch.id

    def update_handle(self, watch_id: int, events: int) -> None:
        watch = self._watches.get(watch_id)
        if watch is None or watch.events == events:
            return
        watch.events = events
        if (
            threading.get_ident() == self._thread
            and events & ~self._watched.get(watch.fd, 0) & (READABLE | WRITABLE) == 0
        ):
            # Fewer events than the loop watches: taken off only if one comes
            # unwanted (`_dispatch`), since libvirt turns them back on at the end of
            # the very call that turned them off.
            return
        self._changed(watch.fd)

    def remove_handle(self, watch_id: int) -> int:
        with self._lock:
            watch = self._watches.pop(watch_id, None)
            if watch is None:
                return -1
            same_fd = self._by_fd[watch.fd]
            del same_fd[watch_id]
            if not same_fd:
                del self._by_fd[watch.fd]
                self._reset.add(watch.fd)
        self._changed(watch.fd)
        self._post(self._free, watch.opaque)
        return 0

    def _changed(self, fd: int) -> None:
        with self._lock:
            self._dirty.add(fd)
            if self._sync_due:
                return
            self._sync_due = True
        self._post(self._sync)

    def _sync(self) -> None:
        """Watch on the loop what libvirt wants watched now."""
        with self._lock:
            self._sync_due = False
            dirty, self._dirty = self._dirty, set()
            reset, self._reset = self._reset, set()
            wanted = {
                fd: _union(self._by_fd[fd].values()) if fd in self._by_fd else 0 for fd in dirty
            }
        loop = self.loop
        for fd, events in wanted.items():
            watched = self._watched.get(fd, 0)
            if fd in reset and watched:  # maybe a new file behind the same number
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                watched = 0
            if events == watched:
                continue
            try:
                if events & READABLE and not watched & READABLE:
                    loop.add_reader(fd, self._dispatch, fd, READABLE)
                elif watched & READABLE and not events & READABLE:
                    loop.remove_reader(fd)
                if events & WRITABLE and not watched & WRITABLE:
                    loop.add_writer(fd, self._dispatch, fd, WRITABLE)
                elif watched & WRITABLE and not events & WRITABLE:
                    loop.remove_writer(fd)
            except (OSError, ValueError) as error:  # closed already: libvirt removes it next
                log.debug("libvirt events: cannot watch fd %d: %s", fd, error)
                loop.remove_reader(fd)
                loop.remove_writer(fd)
                events = 0
            if events:
                self._watched[fd] = events
            else:
                self._watched.pop(fd, None)

    def _dispatch(self, fd: int, event: int) -> None:
        with self._lock:
            watches = tuple(self._by_fd.get(fd, {}).values())
        soon: list[tuple[_Timer, _Soon]] = []
        self._soon = soon
        try:
            wanted = False
            for watch in watches:
                if watch.events & event:  # still wanted (a change may not be applied yet)
                    wanted = True
                    watch.callback(watch.id, fd, event, watch.opaque)
            if not wanted:
                self._changed(fd)  # stop watching what nobody wants
        finally:
            self._soon = None
        # What the callbacks made due (libvirt signals a stream event with a zero
        # timeout): now, not after another turn of the loop.
        for timer, mark in soon:
            if timer.handle is mark and not mark.cancelled:
                self._fire(timer)

    # --- timers -------------------------------------------------------------------------

    def add_timeout(self, timeout: int, callback: TimeoutCallback, opaque: Any) -> int:
        timer = _Timer(next(self._ids), timeout, callback, opaque)
        with self._lock:
            self._timers[timer.id] = timer
        self._arm_from_anywhere(timer)
        return timer.id

    def update_timeout(self, timer_id: int, timeout: int) -> None:
        timer = self._timers.get(timer_id)
        if timer is None:
            return
        timer.timeout = timeout
        self._arm_from_anywhere(timer)

    def remove_timeout(self, timer_id: int) -> int:
        with self._lock:
            timer = self._timers.pop(timer_id, None)
        if timer is None:
            return -1
        timer.removed = True
        self._arm_from_anywhere(timer)
        self._post(self._free, timer.opaque)
        return 0

    def _arm_from_anywhere(self, timer: _Timer) -> None:
        if threading.get_ident() == self._thread:
            try:  # noqa: SIM105 (not suppress(): this runs twice per keystroke)
                self._arm(timer)
            except RuntimeError:  # the loop is closed: the process is ending
                pass
        else:
            self._post(self._arm, timer)

    def _arm(self, timer: _Timer) -> None:
        handle = timer.handle
        if timer.timeout > 0 and not timer.removed:
            due = self.loop.time() + timer.timeout / 1000
            timer.due = due
            if isinstance(handle, asyncio.TimerHandle) and handle.when() <= due:
                return  # it fires first, then waits for `due` (`_fire`)
        if handle is not None:
            handle.cancel()
            timer.handle = None
        if timer.removed or timer.timeout < 0:
            return
        if timer.timeout == 0:
            if self._soon is not None:  # in `_dispatch`: right after the callback
                mark = _Soon()
                timer.handle = mark
                self._soon.append((timer, mark))
            else:
                timer.handle = self.loop.call_soon(self._fire, timer)
        else:
            timer.handle = self.loop.call_at(timer.due, self._fire, timer)

    def _fire(self, timer: _Timer) -> None:
        timer.handle = None
        if timer.removed or timer.timeout < 0:
            return
        if timer.timeout > 0 and timer.due - self.loop.time() > _EARLY:
            # Set again since it was armed: not due yet.
            timer.handle = self.loop.call_at(timer.due, self._fire, timer)
            return
        try:
            timer.callback(timer.id, timer.opaque)
        finally:
            if timer.handle is None and timer.timeout >= 0:  # the callback did not change it: again
                try:  # noqa: SIM105 (as in `_arm_from_anywhere`)
                    self._arm(timer)
                except RuntimeError:  # the loop is closed: the process is ending
                    pass


def _union(watches: Any) -> int:
    events = 0
    for watch in watches:
        events |= watch.events
    return events & (READABLE | WRITABLE)
