"""Viewers nobody here wrote, through the gateway, against real QEMU.

- Two TigerVNC `vncviewer`s, each on its own Xvfb display (so each has its own
  X clipboard): text put on the first display's CLIPBOARD with `xclip` comes
  out of the second display's. It travels as Extended Clipboard messages (the
  viewer announces, QEMU asks for it, the viewer provides it zlib-compressed),
  which QEMU 7.2 offers only to viewers that advertise the pseudo-encoding.
- gtk-vnc (Debian's system Python with GVnc): with QEMU's power-control on, the
  connection reports power control initialised through the gateway (the
  condition for gvncviewer's Power menu), from QEMU's xvp INIT.

Each test starts its own Xvfb displays and viewers and stops them by their pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.integration.test_gateway import TIMEOUT, MakeRig
from tests.integration.test_gateway import make_rig as make_rig  # the fixture, for pytest

#: Seconds between polls of an X client's answer (nothing to wait on but asking again).
POLL = 0.2


def need(binary: str) -> str:
    path = shutil.which(binary)
    assert path is not None, f"{binary} is missing (scripts/setup installs it)"
    return path


class Processes:
    """Processes a test started; all stopped, by pid, at the end."""

    def __init__(self) -> None:
        self.started: list[asyncio.subprocess.Process] = []

    async def start(
        self, *args: str, log: Path | None = None, **options: object
    ) -> asyncio.subprocess.Process:
        """Start a process; with `log`, its stderr goes to that file."""
        with contextlib.ExitStack() as files:
            if log is not None:
                options["stderr"] = files.enter_context(log.open("wb"))
            process = await asyncio.create_subprocess_exec(*args, **options)  # type: ignore[arg-type]
        self.started.append(process)
        return process

    async def stop(self) -> None:
        for process in reversed(self.started):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                try:
                    async with asyncio.timeout(10):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        await started.stop()


def display_taken(number: int) -> bool:
    return os.path.exists(f"/tmp/.X{number}-lock") or os.path.exists(f"/tmp/.X11-unix/X{number}")


async def xvfb(processes: Processes, log: Path) -> str:
    """A fresh Xvfb on a display number nobody uses; its display name, once it answers.

    Numbers start high and are tried in turn: other tests on this machine may run
    their own Xvfb (X's lock files tell which numbers are taken).
    """
    for number in range(100 + os.getpid() % 500, 1000):
        if display_taken(number):
            continue
        display = f":{number}"
        server = await processes.start(
            need("Xvfb"),
            display,
            "-screen",
            "0",
            "800x600x24",
            "-nolisten",
            "tcp",
            # Without it Xvfb resets when its last client leaves (our probe below),
            # and a viewer connecting meanwhile is turned away.
            "-noreset",
            stdout=asyncio.subprocess.DEVNULL,
            log=log,
        )

        async def answers(
            display: str = display, server: asyncio.subprocess.Process = server
        ) -> bool:
            if server.returncode is not None:
                return True  # it lost the race for this number: try the next
            code, _ = await run(need("xdotool"), "getdisplaygeometry", display=display)
            return code == 0

        await until(answers)
        if server.returncode is None:
            return display
    raise AssertionError("no free X display number")


async def run(
    *args: str, display: str, stdin: bytes | None = None, timeout: float = TIMEOUT
) -> tuple[int, bytes]:
    """Run an X client on `display`: its exit code and output (-1 if it timed out)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, "DISPLAY": display},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate(stdin)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, b""
    assert process.returncode is not None
    return process.returncode, output


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            if await check():
                return
            await asyncio.sleep(POLL)


async def viewer_window(display: str, viewer: asyncio.subprocess.Process, log: Path) -> str:
    """The id of TigerVNC's window on `display`, once it is mapped."""
    found = ""

    async def mapped() -> bool:
        nonlocal found
        if viewer.returncode is not None:
            text = await asyncio.to_thread(log.read_text, errors="replace")
            raise AssertionError(f"vncviewer exited: {text[-2000:]}")
        code, output = await run(
            need("xdotool"), "search", "--onlyvisible", "--name", "TigerVNC", display=display
        )
        found = output.decode().split()[0] if code == 0 and output.split() else ""
        return bool(found)

    await until(mapped)
    return found


async def test_tigervnc_clipboard_between_two_viewers(
    make_rig: MakeRig, processes: Processes, tmp_path: Path
) -> None:
    """Issue 9 #7 A with the issue's own viewers: copy in one TigerVNC, paste in
    the other, through the gateway."""
    rig = await make_rig(guest_options={"audio": False})
    socket_path = rig.address.removeprefix("unix:")
    displays = [await xvfb(processes, tmp_path / f"xvfb{i}.log") for i in (0, 1)]
    viewers = []
    for index, display in enumerate(displays):
        viewer = await processes.start(
            need("vncviewer"),
            "-SecurityTypes=None",
            "-Shared=1",  # TigerVNC asks for exclusive access by default
            "-AcceptClipboard=1",
            "-SendClipboard=1",
            "-SendPrimary=0",
            "-SetPrimary=0",
            "-Log=*:stderr:100",
            socket_path,
            env={**os.environ, "DISPLAY": display},
            stdout=asyncio.subprocess.DEVNULL,
            log=tmp_path / f"vncviewer{index}.log",
        )
        viewers.append(viewer)
    windows = [
        await viewer_window(display, viewer, tmp_path / f"vncviewer{index}.log")
        for index, (display, viewer) in enumerate(zip(displays, viewers, strict=True))
    ]
    # TigerVNC passes clipboard changes on only while its window has the focus
    # (Xvfb runs no window manager to give it one).
    for display, window in zip(displays, windows, strict=True):
        code, output = await run(need("xdotool"), "windowfocus", "--sync", window, display=display)
        assert code == 0, output
    text = b"copied in the first TigerVNC through the gateway"
    # xclip keeps serving the selection until another client takes it.
    await processes.start(
        need("xclip"),
        "-quiet",
        "-selection",
        "clipboard",
        "-in",
        env={**os.environ, "DISPLAY": displays[0]},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    owner = processes.started[-1]
    assert owner.stdin is not None
    owner.stdin.write(text)
    owner.stdin.close()

    async def pasted() -> bool:
        # A selection owner that never answers would hang xclip: ask again.
        code, output = await run(
            need("xclip"), "-selection", "clipboard", "-out", display=displays[1], timeout=5
        )
        attempts.append((code, output))
        return code == 0 and output == text

    attempts: list[tuple[int, bytes]] = []

    try:
        await until(pasted)
    except TimeoutError:
        logs = "\n".join(
            (tmp_path / f"vncviewer{i}.log").read_text(errors="replace")[-3000:] for i in (0, 1)
        )
        raise AssertionError(
            f"the text never reached the second viewer ({attempts[-3:]}):\n{logs}"
        ) from None


GTKVNC_POWER = Path(__file__).parent / "viewers" / "gtkvnc_power.py"
#: Debian's Python, which has gtk-vnc's GObject bindings (our venv does not).
SYSTEM_PYTHON = "/usr/bin/python3"


async def test_gtk_vnc_sees_power_control_through_the_gateway(
    make_rig: MakeRig, processes: Processes, tmp_path: Path
) -> None:
    """Issue 9 #7 B with gtk-vnc (gvncviewer's widget): QEMU's xvp INIT reaches it
    through the gateway (the Power menu's condition), and its reboot request
    reaches QEMU, whose xvp FAIL comes back."""
    rig = await make_rig(guest_options={"audio": False, "vnc_power_control": True})
    display = await xvfb(processes, tmp_path / "xvfb.log")
    code, output = await run(
        need(SYSTEM_PYTHON), str(GTKVNC_POWER), rig.address.removeprefix("unix:"), display=display
    )
    lines = output.decode(errors="replace").splitlines()
    assert code == 0, output.decode(errors="replace")
    assert "power-control-initialized" in lines
    assert "power-control-failed" in lines
