"""The wake-up floor benchmark runs and reports both receivers (no timing assertions)."""

from __future__ import annotations

import re
import socket

import pytest

from bench import wakeup_floor


def test_both_receivers_measured(capsys: pytest.CaptureFixture[str]) -> None:
    assert wakeup_floor.main(["--seconds", "0.5", "--rounds", "2", "--interval", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("200 chunks a second, 2 x 0.5 s each")
    for name in wakeup_floor.RECEIVERS:
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        median, low, high = (float(x) for x in re.findall(r"(\d+\.\d+)", line)[:3])
        assert low <= median <= high


def test_receiver_sees_every_byte() -> None:
    # The figures are only worth something if the receivers really read the stream.
    seen: list[int] = []

    def counting(sock: socket.socket) -> None:
        while data := sock.recv(65536):
            seen.append(len(data))

    wakeup_floor.measure(counting, 0.2, 0.01)
    assert sum(seen) % wakeup_floor.CHUNK == 0
    assert sum(seen) >= 10 * wakeup_floor.CHUNK
