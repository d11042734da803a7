"""The README's run command (`./scripts/run --once`) does what the README says on a
machine with no session bus and no sound server: a private bus and a private
PulseAudio, the service activated on it, the demo guest reached through
resourcectl, an fd and a PTY, its beep played and recorded."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from resourced.demo.bootsector import tone_frequency
from resourced.demo.tour import _show
from resourced.errors import ResourcedError


async def test_tour_once_without_a_session_bus(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "PULSE_SERVER")
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.demo.tour",
        "--once",
        "--duration",
        "1",
        "--wav",
        str(tmp_path / "beep.wav"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(180):
        out, err = await process.communicate()
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert "a private one at unix:path=" in text
    assert re.search(r"demo +connected", text), text
    assert "monitor,serial0" in text
    assert "resourced demo guest" in text.split("$ resourcectl history demo serial0")[1]
    assert "typed 'typed into an fd', the guest echoed it" in text
    assert "typed 'typed into a pty', the guest echoed it" in text
    # No sound server here either: a private PulseAudio, the beep played into it
    # and recorded back from its monitor, then recorded to WAV by the service.
    assert "a private PulseAudio at unix:" in text, text
    played = re.search(r"played: .* recorded back from \S+: ([\d.]+) s, (\d+) Hz", text)
    assert played is not None, text
    # Played: the player may steer its rate by up to 3 % while it settles.
    assert float(played.group(2)) == pytest.approx(tone_frequency(440), rel=0.03)
    assert "$ resourcectl audio demo status" in text
    recorded = re.search(r"recorded: .*beep.wav: ([\d.]+) s of .*, (\d+) Hz", text)
    assert recorded is not None, text
    assert float(recorded.group(1)) >= 0.5
    assert float(recorded.group(2)) == pytest.approx(tone_frequency(440), abs=8)


def _processes_naming(text: str) -> list[str]:
    """The command lines of the processes that mention `text` (a work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # it ended meanwhile
            if text in cmdline:
                found.append(cmdline)
    return found


async def _start_tour(*args: str) -> asyncio.subprocess.Process:
    """The tour (`--once`) in a session of its own, without the caller's bus or
    sound server, its output (stdout and stderr) piped."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS", "PULSE_SERVER")
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.demo.tour",
        "--once",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


async def _interrupt(process: asyncio.subprocess.Process, seen: str) -> tuple[str, str]:
    """Ctrl-C as a terminal sends it (SIGINT to the process group); wait for the
    tour to exit. Returns its private work folder (from `seen`, what it printed
    so far) and what it printed after."""
    assert process.stdout is not None
    match = re.search(r"private PulseAudio at unix:(/tmp/rsd-demo-[^/]+)/", seen)
    assert match is not None, seen
    os.killpg(process.pid, signal.SIGINT)
    async with asyncio.timeout(120):
        rest = (await process.stdout.read()).decode()
        await process.wait()
    return match.group(1), rest


async def _nothing_left_naming(workdir: str, output: str) -> None:
    """The tour's processes stop on their own a little after it: wait for that."""
    deadline = time.monotonic() + 30
    while (left := _processes_naming(workdir)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert left == [], output


async def test_tour_interrupted_while_starting_leaves_nothing_running(tmp_path: Path) -> None:
    """Ctrl-C right after the private PulseAudio is up, while the bus and QEMU
    start: the tour exits 130 and the PulseAudio, which runs in a session of its
    own, goes with it."""
    process = await _start_tour("--wav", str(tmp_path / "beep.wav"))
    assert process.stdout is not None
    try:
        async with asyncio.timeout(120):
            line = (await process.stdout.readline()).decode()
        workdir, rest = await _interrupt(process, line)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 130, line + rest
    await _nothing_left_naming(workdir, rest)


async def test_tour_interrupted_while_recording_prints_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C while the service records the beep: the tour's cleanup must not end
    in a traceback (dbus-fast's, from a message sent on a bus connection already
    closed), and nothing is left running."""
    wav = tmp_path / "beep.wav"
    process = await _start_tour("--duration", "120", "--wav", str(wav))
    assert process.stdout is not None
    seen = ""
    try:
        async with asyncio.timeout(180):
            # The recorded file's name, printed under the record command, comes
            # just before the tour waits `--duration` seconds.
            while f"record {wav}\n  {wav}\n" not in seen:
                line = (await process.stdout.readline()).decode()
                assert line, seen
                seen += line
        workdir, rest = await _interrupt(process, seen)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 130, seen + rest
    assert "Traceback" not in rest, rest
    assert "never retrieved" not in rest, rest
    await _nothing_left_naming(workdir, rest)


def test_a_command_the_tour_shows_interrupted_is_not_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C reaches the tour's commands too: one interrupted while Python starts
    prints a KeyboardInterrupt traceback, which the tour does not pass on."""
    child = "import os, signal; os.kill(os.getpid(), signal.SIGINT); import time; time.sleep(60)"
    with pytest.raises(ResourcedError, match="python was interrupted"):
        _show(["python", "-c", child], dict(os.environ))
    out = capsys.readouterr().out
    assert out.startswith("$ python -c"), out
    assert "Traceback" not in out, out
    assert "KeyboardInterrupt" not in out, out
