"""A PTY console honours libvirt's device lock files (issue #9, item 4): real PTYs
(`openpty`), real processes as lock holders (a `sleep` that is alive, one that
has exited), lock files in the test's own directory in libvirt's naming and
format."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from resourced.consoles import ConsoleKind
from resourced.consoles.hub import ConsoleHub
from resourced.consoles.ptylock import PtyLocked, acquire, lock_path, release
from resourced.consoles.sources import PtySource
from tests.consoles.test_hub import TIMEOUT, PtyPeer, until


@pytest.fixture
async def pty() -> AsyncIterator[PtyPeer]:
    peer = PtyPeer()
    peer.close_slave()  # the hub opens the slave by its path
    yield peer
    peer.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "300"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def lock_file_for(peer: PtyPeer, directory: Path) -> Path:
    return Path(lock_path(peer.path, str(directory)))


def pty_hub(peer: PtyPeer, directory: Path) -> ConsoleHub:
    return ConsoleHub(1, "serial0", ConsoleKind.SERIAL, PtySource(peer.path, str(directory)), 64)


def test_lock_file_named_as_libvirt_names_it() -> None:
    assert lock_path("/dev/pts/7") == "/var/lock/LCK.._pts_7"
    # libvirt drops "/dev" only: the slash after it becomes an underscore too.
    assert lock_path("/dev/ttyS0", "/run/lock") == "/run/lock/LCK.._ttyS0"


async def test_pty_held_under_a_lock_file_with_our_pid(pty: PtyPeer, tmp_path: Path) -> None:
    hub = pty_hub(pty, tmp_path)
    hub.start()
    lock = lock_file_for(pty, tmp_path)
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        assert lock.read_bytes() == b"%10d\n" % os.getpid()  # FHS format, as libvirt writes
        pty.write(b"output")
        await until(lambda: hub.total == 6, hub)
    finally:
        await hub.close()
    assert not lock.exists()  # removed when done


async def test_pty_locked_by_a_live_process_is_not_opened(
    pty: PtyPeer, tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    lock = lock_file_for(pty, tmp_path)
    held = b"%10d\n" % sleeper.pid
    lock.write_bytes(held)
    hub = pty_hub(pty, tmp_path)
    hub.start()
    try:
        await until(lambda: hub.last_error is not None, hub)
        assert not hub.connected
        error = hub.last_error or ""
        assert f"locked by lock file {lock}, held by process {sleeper.pid}" in error, error
        assert lock.read_bytes() == held  # left alone
        # The holder exits without cleaning up: its lock is stale, we take it.
        sleeper.kill()
        sleeper.wait()
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        assert lock.read_bytes() == b"%10d\n" % os.getpid()
    finally:
        await hub.close()
    assert not lock.exists()


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    process = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, check=True)
    return int(process.stdout)


async def test_stale_lock_of_a_dead_process_is_taken_over(
    pty: PtyPeer, tmp_path: Path, dead_pid: int
) -> None:
    lock = lock_file_for(pty, tmp_path)
    lock.write_bytes(b"%10d\n" % dead_pid)
    hub = pty_hub(pty, tmp_path)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        assert lock.read_bytes() == b"%10d\n" % os.getpid()
    finally:
        await hub.close()
    assert not lock.exists()


def test_garbage_lock_file_is_stale_and_a_live_one_refused(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    lock = Path(lock_path("/dev/pts/999", str(tmp_path)))
    lock.write_bytes(b"not a pid\n")
    assert acquire("/dev/pts/999", str(tmp_path)) == str(lock)
    release(str(lock))
    assert not lock.exists()
    lock.write_bytes(b"%d\n" % sleeper.pid)  # not right-aligned: still read
    with pytest.raises(PtyLocked) as refused:
        acquire("/dev/pts/999", str(tmp_path))
    assert refused.value.pid == sleeper.pid
    release(str(lock))  # not ours: left alone
    assert lock.exists()


def test_no_lock_directory_means_no_lock(tmp_path: Path) -> None:
    assert acquire("/dev/pts/999", str(tmp_path / "missing")) is None
