"""VNC passwords from a real Secret Service (GNOME Keyring on the test's private
bus), stored the way virt-manager stores them (attributes uuid and hvuri)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from resourced.dbus.bus import ServiceBus
from resourced.dbus.secrets import console_password
from tests.dbus.conftest import TIMEOUT, Session

UUID = "6f2b54a8-3c1e-4d7a-9a43-2b8c1e5d0f11"
URI = "qemu+ssh://virthost/system"


@pytest.fixture
def keyring(session: Session) -> Iterator[dict[str, str]]:
    """gnome-keyring-daemon (secrets only) on the session's bus, unlocked."""
    binary = shutil.which("gnome-keyring-daemon")
    assert binary is not None, "gnome-keyring-daemon is not installed (Debian gnome-keyring)"
    home = session.directory / "keyring-home"
    (home / "data").mkdir(parents=True)
    env = {**session.env, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    daemon = subprocess.Popen(
        [binary, "--foreground", "--unlock", "--components=secrets"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert daemon.stdin is not None
    daemon.stdin.write(b"login-keyring-password")
    daemon.stdin.close()
    try:
        deadline = time.monotonic() + TIMEOUT
        while session.busctl("status", "org.freedesktop.secrets").returncode != 0:
            assert daemon.poll() is None, "gnome-keyring-daemon exited"
            assert time.monotonic() < deadline, "gnome-keyring-daemon did not take its name"
            time.sleep(0.1)
        yield env
    finally:
        daemon.terminate()
        daemon.wait(TIMEOUT)


def store(env: dict[str, str], password: str, uuid: str, uri: str) -> None:
    subprocess.run(
        ["secret-tool", "store", "--label=VM console password", "uuid", uuid, "hvuri", uri],
        input=password.encode(),
        env=env,
        check=True,
        timeout=TIMEOUT,
    )


async def test_password_stored_by_virt_manager_is_found(
    session: Session, keyring: dict[str, str]
) -> None:
    await asyncio.to_thread(store, keyring, "pässwö", UUID, URI)
    bus = await ServiceBus(bus_address=session.address).connect()
    try:
        assert await console_password(bus, UUID, URI) == "pässwö"
        # Another URI or another guest: nothing.
        assert await console_password(bus, UUID, "qemu:///system") is None
        assert await console_password(bus, "0" * 8 + UUID[8:], URI) is None
    finally:
        bus.disconnect()


async def test_no_secret_service_is_no_password(session: Session) -> None:
    bus = await ServiceBus(bus_address=session.address).connect()
    try:
        assert await console_password(bus, UUID, URI) is None
    finally:
        bus.disconnect()
