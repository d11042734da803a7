"""resourced's audio path, fed as the service feeds it (for bench/audio_bench.py).

Run it with the project's venv:

    .venv/bin/python bench/resourced_audio_player.py [--floor] SOCKET

It connects our asyncio RFB client (`resourced.rfb.aio.connect`) to the VNC
server on the Unix socket SOCKET with the `QemuAudio` extension (the default
format, S16 2 channels 44100 Hz, which QemuAudio enables once the server
acknowledges it), and plays what arrives through `resourced.sinks.pulse`: one
`PulsePlayback` on a `PulseServer` (`PULSE_SERVER`; the sink is the server's
default, or `PULSE_SINK`). Events are pushed from the socket's read callback
(`RfbClient.dispatch_to`, as the broker's `GuestLink` does) and handed on
as the service will: `begin` on AudioBegin, `write` on AudioData, `end` on
AudioEnd.

`RESOURCED_AUDIO_PROFILE=FILE` runs it under cProfile and writes the
statistics to FILE (`RESOURCED_AUDIO_DEBUG=1` logs the player's state).

It runs until the server closes the connection, then prints one JSON line on
stdout: the playback's underruns, and its reported latency (`latency_usec`:
what its stream holds plus the sink's part) sampled every 100 ms while playing.

With `--floor` it plays nothing: no sound-server connection, and every event
is dropped as it comes. What it then costs (the benchmark's
`resourced-floor` row) is our asyncio client's share alone: reading the
socket, parsing the messages, one event-loop wake-up per chunk. It is the
least any player built on that client could cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from resourced.errors import ConnectionClosed
from resourced.rfb.aio import connect
from resourced.rfb.qemu import AudioBegin, AudioData, AudioEnd, QemuAudio
from resourced.sinks.pulse import PulseServer


async def receive(path: str, handle: Callable[[Any], None]) -> list[str]:
    """Connect to the server at `path`, push every event to `handle` until it
    closes; the errors met, as text."""
    errors: list[str] = []
    client = await connect(f"unix:{path}", extensions=[QemuAudio()])
    try:
        await client.dispatch_to(handle)
    except ConnectionClosed:
        pass
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        await client.close()
    return errors


async def receive_only(path: str) -> dict[str, Any]:
    """Receive and parse the audio as `play` does, and drop it (no sink at all)."""
    errors = await receive(path, lambda event: None)
    return {"underruns": None, "latency_usec": [], "errors": errors}


async def play(path: str) -> dict[str, Any]:
    pulse = PulseServer(os.environ.get("PULSE_SERVER"))
    await pulse.start()
    # The service's connection to the sound server is up long before a guest
    # plays: so is this one before the player asks for audio.
    # (PulseServer offers no event for it: polled, for up to 20 s.)
    for _ in range(1000):
        if pulse.connected:
            break
        await asyncio.sleep(0.02)
    else:
        raise SystemExit(f"no connection to the sound server {os.environ.get('PULSE_SERVER')}")
    playback = pulse.playback("resourced audio bench")
    latencies: list[float] = []
    playing = False

    def handle(event: Any) -> None:
        nonlocal playing
        if isinstance(event, AudioData):
            playback.write(event.data)
        elif isinstance(event, AudioBegin):
            playback.begin(event.format)
            playing = True
        elif isinstance(event, AudioEnd):
            playback.end()
            playing = False

    async def sample_latency() -> None:
        while True:
            await asyncio.sleep(0.1)
            if playing:
                value = playback.latency_usec
                if value:  # 0 while the stream is not ready
                    latencies.append(float(value))

    sampler = asyncio.ensure_future(sample_latency())
    try:
        errors = await receive(path, handle)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    underruns = playback.underruns
    playback.close()
    await pulse.close()
    return {"underruns": underruns, "latency_usec": latencies, "errors": errors}


def main() -> int:
    if os.environ.get("RESOURCED_AUDIO_DEBUG"):
        # The player's state changes (cork, underflow, pause, re-sync) on stderr,
        # which the benchmark keeps with --keep.
        logging.basicConfig(
            level=logging.DEBUG, format="%(relativeCreated)9.0f %(name)s %(message)s"
        )
    args = sys.argv[1:]
    floor = "--floor" in args
    path = next(arg for arg in args if arg != "--floor")
    profile_path = os.environ.get("RESOURCED_AUDIO_PROFILE")
    if profile_path:
        # Where the player's CPU goes (bench/README.md, "What a chunk costs").
        import cProfile

        with cProfile.Profile() as profile:
            report = asyncio.run(receive_only(path) if floor else play(path))
        profile.dump_stats(profile_path)
    else:
        report = asyncio.run(receive_only(path) if floor else play(path))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
