"""The README's run command does what the README says (its main job, end to end)."""

from __future__ import annotations

import asyncio
import sys
import wave
from pathlib import Path

import pytest

from resourced.demo.bootsector import tone_frequency


async def test_demo_run(tmp_path: Path) -> None:
    wav = tmp_path / "beep.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.demo.probe",
        "--duration",
        "1",
        "--wav",
        str(wav),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "server:    QEMU (resourced demo guest)" in text
    assert "resourced demo guest (replayed from the gateway's history)" in text
    assert "the guest echoed 'hello from resourced'" in text
    assert "VM status: running" in text
    pitch = float(text.split("pitch:")[1].split("Hz")[0])
    assert pitch == pytest.approx(tone_frequency(440), abs=8)
    with wave.open(str(wav)) as recording:
        assert recording.getnframes() >= 44100 * 0.9
