"""The audio benchmark still works: both players, both sound servers, every condition.

`--short` sizes (4 s per condition), no timing assertions: this proves the
plumbing (the test RFB server speaking QEMU's audio extension, gtk-vnc's
PulseAudio path from Debian's python3, resourced's player, private PulseAudio
and PipeWire servers with their null sinks, parec's recording, the click
decoder) and that every figure is a number, not what the figures are.
The signal's own round trip (made, then found again) is checked without any
sound server.
"""

from __future__ import annotations

import array
import json
import math

import pytest

from bench.audio_bench import (
    CONDITIONS,
    FLOOR,
    GTKVNC,
    PIPEWIRE,
    PLAYERS,
    PULSEAUDIO,
    RECORD_FRAME,
    RECORD_RATE,
    RESOURCED,
    Options,
    Signal,
    analyse,
    format_table,
    run_benchmark,
)
from resourced.audio import AudioFormat


def test_the_signal_is_found_again_click_by_click() -> None:
    signal = Signal(AudioFormat())  # s16 stereo 44100: the recording's own format
    seconds = 5
    pcm = bytearray(signal.frames(0, RECORD_RATE * seconds))
    # A 5 ms hole at 2.25 s, between two clicks.
    hole = int(2.25 * RECORD_RATE) * RECORD_FRAME
    pcm[hole : hole + 5 * RECORD_FRAME * RECORD_RATE // 1000] = bytes(
        5 * RECORD_FRAME * RECORD_RATE // 1000
    )
    # As if read 10 ms at a time, each read on time.
    step = RECORD_RATE // 100 * RECORD_FRAME
    reads = [
        (100.0 + (k + 1) / 100, min((k + 1) * step, len(pcm))) for k in range(len(pcm) // step)
    ]

    heard = analyse(bytes(pcm), reads)

    assert sorted(heard.clicks) == list(range(1, 2 * seconds))  # one every 500 ms from 0.5 s
    for number, at in heard.clicks.items():
        assert at == pytest.approx(100.0 + number * 0.5, abs=0.5 / RECORD_RATE)
    assert heard.undecoded == 0
    assert len(heard.dropouts) == 1
    assert 5.0 <= heard.dropouts[0] < 5.5


@pytest.mark.parametrize("speed", [0.97, 1.03])
def test_clicks_are_found_when_played_faster_or_slower(speed: float) -> None:
    # A player that corrects skew by resampling plays a few % off the sender's
    # speed: here, every frame taken from the nearest one at that speed.
    pcm = array.array("h", Signal(AudioFormat()).frames(0, RECORD_RATE * 4))
    stretched = array.array("h")
    for i in range(int(len(pcm) // 2 / speed) - 1):
        source = round(i * speed) * 2
        stretched.extend(pcm[source : source + 2])
    step = RECORD_RATE // 100 * RECORD_FRAME
    data = stretched.tobytes()
    reads = [(1.0 + (k + 1) / 100, (k + 1) * step) for k in range(len(data) // step)]

    heard = analyse(data, reads)

    assert sorted(heard.clicks) == list(range(1, 8))
    assert heard.undecoded == 0
    spacing = heard.click_frames[7] - heard.click_frames[1]
    assert spacing == pytest.approx(6 * 0.5 * RECORD_RATE / speed, abs=2)


@pytest.mark.integration
@pytest.mark.timeout(900)
async def test_short_run_both_players_both_servers() -> None:
    options = Options(servers=(PULSEAUDIO, PIPEWIRE), players=PLAYERS, seconds=4.0)
    results = await run_benchmark(options)
    playing = (GTKVNC, RESOURCED)

    assert results.unavailable == {}, results.unavailable
    assert [server.kind for server in results.servers] == [PULSEAUDIO, PIPEWIRE]
    for server in results.servers:
        assert server.error is None, server.error
        assert server.version
        ran = {(run.player, run.condition) for run in server.runs}
        # The floor runs in the first condition only.
        assert ran == {(p, c.name) for p in playing for c in CONDITIONS} | {
            (FLOOR, CONDITIONS[0].name)
        }
        for run in server.runs:
            where = f"{server.kind} {run.player} {run.condition}"
            assert run.error is None, f"{where}: {run.error}"
            assert run.clicks_sent >= 7, where
            assert run.cpu_percent is not None
            assert math.isfinite(run.cpu_percent), where
            assert run.cpu_percent >= 0, where
            if run.player == FLOOR:
                # It receives the whole signal and plays none of it.
                assert run.clicks_heard == 0, where
                continue
            assert run.clicks_heard > 0, f"{where}: no click found"
            for value in (run.p(0.5), run.p(0.99), run.first_ms, run.last_ms):
                assert isinstance(value, float), where
                assert math.isfinite(value), where
            assert all(math.isfinite(ms) and ms > 0 for ms in run.dropouts_ms), where
            if run.player != GTKVNC:
                assert isinstance(run.underruns, int), where

    table = format_table(results)
    assert "not available" not in table
    assert "failed" not in table
    assert "resourced-floor" in table
    document = json.loads(json.dumps(results.to_json()))
    for kind in (PULSEAUDIO, PIPEWIRE):
        for condition in CONDITIONS:
            for player in playing:
                figures = document["servers"][kind][condition.name][player]
                assert isinstance(figures["latency_p50_ms"], float)
                assert isinstance(figures["dropouts"], int)
        floor = document["servers"][kind][CONDITIONS[0].name][FLOOR]
        assert isinstance(floor["cpu_percent"], float)
