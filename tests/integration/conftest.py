"""Fixtures that run the demo guest under real QEMU for the integration tests.

`guest_dir` is a fresh short directory (Unix socket paths must stay under 108
bytes, which pytest's own tmp_path can exceed); `make_guest` starts guests and
stops every one of them at teardown; `qemu_guest` is one started guest with
audio. A missing QEMU makes these fixtures fail with the binary's name: these
tests are never skipped.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from resourced.demo.qemu import GuestConfig, QemuGuest

# Generous: QEMU under TCG on a loaded 2-core machine can take many seconds to
# come up, and several test guests may start at once.
START_TIMEOUT = 60.0


class MakeGuest(Protocol):
    """`await make_guest(**GuestConfig fields)`; `start=False` to start it yourself."""

    def __call__(self, *, start: bool = True, **overrides: Any) -> Awaitable[QemuGuest]: ...


@pytest.fixture
def guest_dir() -> Iterator[Path]:
    # Directly under /tmp whatever TMPDIR says, to keep socket paths short.
    path = Path(tempfile.mkdtemp(prefix="rsd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def make_guest(guest_dir: Path) -> AsyncIterator[MakeGuest]:
    guests: list[QemuGuest] = []

    async def make(*, start: bool = True, **overrides: Any) -> QemuGuest:
        overrides.setdefault("workdir", guest_dir / f"g{len(guests)}")
        guest = QemuGuest(GuestConfig(**overrides))
        guests.append(guest)
        if start:
            await guest.start(timeout=START_TIMEOUT)
        return guest

    try:
        yield make
    finally:
        # Stop them all even if one stop fails; report the first failure.
        failures: list[BaseException] = []
        for guest in reversed(guests):
            try:
                await guest.stop()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]


@pytest.fixture
async def qemu_guest(make_guest: MakeGuest) -> QemuGuest:
    return await make_guest(audio=True)
