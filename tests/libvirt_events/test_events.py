"""libvirt's event loop on asyncio (`resourced.libvirt.events`), on the test's own
loop with real sockets and a real second thread. libvirt itself drives it in
tests/dbus/test_libvirt.py (the service: events on its loop, the stream used
there) and the libvirt gateway tests (events on the libvirt thread); here are
the rules libvirt relies on, each made to happen on purpose. The stand-in for the
`libvirt` module only records the free callbacks (libvirt-python's
`virEventInvokeFreeCallback`), which need a real C opaque."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from resourced.libvirt.events import READABLE, WRITABLE, LibvirtEvents

TIMEOUT = 10.0


class FreeRecorder:
    """What `LibvirtEvents` needs of the libvirt module when nothing registers it."""

    def __init__(self) -> None:
        self.freed: list[Any] = []

    def virEventInvokeFreeCallback(self, opaque: Any) -> None:
        self.freed.append(opaque)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # a callback that reads too much must not hang the loop
    yield ours, theirs
    ours.close()
    theirs.close()


async def until(condition: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110 (callbacks from libvirt's side: poll each turn)
            await asyncio.sleep(0.005)


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_watch_follows_what_libvirt_wants_now(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Turned off and on again on the loop's thread (as libvirt does around each
    call): no event while off, events again once on; an unwanted one is never
    delivered."""
    ours, theirs = pair
    libvirt = FreeRecorder()
    events = LibvirtEvents(libvirt, asyncio.get_running_loop())
    calls: list[tuple[int, int]] = []

    def callback(watch: int, fd: int, event: int, opaque: Any) -> None:
        calls.append((fd, event))
        if event & READABLE:
            ours.recv(100)

    watch = events.add_handle(ours.fileno(), READABLE, callback, "opaque")
    theirs.send(b"1")
    await until(lambda: calls)
    assert calls == [(ours.fileno(), READABLE)]

    events.update_handle(watch, 0)
    events.update_handle(watch, READABLE)
    theirs.send(b"2")
    await until(lambda: len(calls) == 2)

    events.update_handle(watch, 0)
    theirs.send(b"3")
    await turns(20)
    assert len(calls) == 2  # not wanted: not delivered (and no longer watched)
    events.update_handle(watch, READABLE)
    await until(lambda: len(calls) == 3)

    events.update_handle(watch, READABLE | WRITABLE)
    await until(lambda: (ours.fileno(), WRITABLE) in calls)
    events.update_handle(watch, READABLE)
    assert events.remove_handle(watch) == 0
    assert events.remove_handle(watch) == -1
    await until(lambda: libvirt.freed == ["opaque"])


async def test_changes_from_another_thread_apply_on_the_loop(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """libvirt registers from whichever thread calls it (a blocking call on the
    libvirt thread); the callbacks still run on the loop's thread."""
    ours, theirs = pair
    events = LibvirtEvents(FreeRecorder(), asyncio.get_running_loop())
    threads: list[int] = []
    fired: list[int] = []

    def callback(watch: int, fd: int, event: int, opaque: Any) -> None:
        threads.append(threading.get_ident())
        ours.recv(100)

    def on_timer(timer: int, opaque: Any) -> None:
        fired.append(threading.get_ident())
        events.update_timeout(timer, -1)

    ids: list[int] = []

    def register() -> None:
        ids.append(events.add_handle(ours.fileno(), READABLE, callback, None))
        ids.append(events.add_timeout(0, on_timer, None))

    other = threading.Thread(target=register)
    other.start()
    other.join()
    theirs.send(b"x")
    await until(lambda: threads and fired)
    assert set(threads + fired) == {threading.get_ident()}

    off = threading.Thread(target=events.update_handle, args=(ids[0], 0))
    off.start()
    off.join()
    theirs.send(b"y")
    await turns(20)
    assert len(threads) == 1


async def test_timers_zero_periodic_off_and_removed() -> None:
    loop = asyncio.get_running_loop()
    libvirt = FreeRecorder()
    events = LibvirtEvents(libvirt, loop)
    zero: list[float] = []
    periodic: list[float] = []
    timer = events.add_timeout(0, lambda _t, _o: zero.append(loop.time()), "zero")
    await until(lambda: len(zero) >= 3)  # every turn of the loop while 0
    events.update_timeout(timer, -1)
    count = len(zero)
    await turns(10)
    assert len(zero) == count

    other = events.add_timeout(20, lambda _t, _o: periodic.append(loop.time()), "periodic")
    await until(lambda: len(periodic) >= 3)
    assert periodic[2] - periodic[0] >= 0.035  # a period each time, not once
    assert events.remove_timeout(other) == 0
    count = len(periodic)
    await asyncio.sleep(0.1)
    assert len(periodic) == count
    assert events.remove_timeout(timer) == 0
    assert events.remove_timeout(timer) == -1
    await until(lambda: sorted(libvirt.freed) == ["periodic", "zero"])


async def test_a_periodic_timer_set_again_counts_from_the_last_time() -> None:
    """libvirt restarts a connection's keepalive timer on every message: a period
    set again before it is due fires only a period after the last setting (the
    loop's handle is kept and armed again if it fires early); a shorter period
    set after a longer one fires at the shorter."""
    loop = asyncio.get_running_loop()
    events = LibvirtEvents(FreeRecorder(), loop)
    fired: list[float] = []
    timer = events.add_timeout(50, lambda _t, _o: fired.append(loop.time()), None)
    settings = [loop.time()]
    for _ in range(10):  # about twice the period of restarts
        await asyncio.sleep(0.01)
        events.update_timeout(timer, 50)
        settings.append(loop.time())
    await until(lambda: fired and fired[-1] > settings[-1])
    for when in fired:
        last = max(s for s in settings if s <= when)
        assert when - last >= 0.045, (when - last, fired, settings)

    events.update_timeout(timer, 60_000)
    count = len(fired)
    events.update_timeout(timer, 20)
    await until(lambda: len(fired) > count)
    assert events.remove_timeout(timer) == 0


async def test_a_zero_timeout_set_in_a_socket_callback_fires_right_after_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """libvirt signals a stream event so: the stream's callback runs before the loop
    turns again (anything the socket's callback scheduled comes after it)."""
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    events = LibvirtEvents(FreeRecorder(), loop)
    order: list[str] = []

    def on_timer(timer: int, opaque: Any) -> None:
        order.append("timer")
        events.update_timeout(timer, -1)

    timer = events.add_timeout(-1, on_timer, None)

    def callback(watch: int, fd: int, event: int, opaque: Any) -> None:
        ours.recv(100)
        loop.call_soon(order.append, "next turn")
        events.update_timeout(timer, 0)

    events.add_handle(ours.fileno(), READABLE, callback, None)
    theirs.send(b"x")
    await until(lambda: len(order) == 2)
    assert order == ["timer", "next turn"]


async def test_a_new_file_behind_a_reused_number_is_watched() -> None:
    """libvirt reconnects: the old socket's watch goes, the socket is closed, and the
    new one may get the same number before the loop turns."""
    events = LibvirtEvents(FreeRecorder(), asyncio.get_running_loop())
    first, first_peer = socket.socketpair()
    seen: list[bytes] = []

    def callback(watch: int, fd: int, event: int, opaque: Any) -> None:
        seen.append(os.read(fd, 100))

    watch = events.add_handle(first.fileno(), READABLE, callback, None)
    first_peer.send(b"old")
    await until(lambda: seen == [b"old"])
    number = first.fileno()
    second, second_peer = socket.socketpair()
    try:
        events.remove_handle(watch)
        first.close()
        first_peer.close()
        os.dup2(second.fileno(), number)  # the same number, another file
        events.add_handle(number, READABLE, callback, None)
        second_peer.send(b"new")
        await until(lambda: seen == [b"old", b"new"])
    finally:
        os.close(number)
        second.close()
        second_peer.close()
