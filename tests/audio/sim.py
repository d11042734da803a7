"""A simulated guest, network and sound card for the play-out logic's tests.

The guest produces chunks by its own clock (skewed), the network delays them in
bursts (arrivals stay in order, as on TCP), and the "sound card" plays the
buffer at the rate the `Playout` asks for, from when the prebuffer is full,
stopping on underrun like PulseAudio with a prebuf. Everything is driven by a
simulated clock; no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from resourced.playout import Playout, PlayoutConfig


@dataclass
class SimResult:
    times: list[float] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)  # buffered seconds before each chunk
    targets: list[float] = field(default_factory=list)
    corrections: list[float] = field(default_factory=list)
    underruns: list[float] = field(default_factory=list)  # times (not those before a pause)
    pauses: list[float] = field(default_factory=list)


def simulate(
    seconds: float,
    *,
    rate: int = 48000,
    chunk_frames: int = 480,
    skew: float = 0.0,
    jitter: float = 0.0,  # longest stall, seconds
    stall_every: float = 0.5,  # mean seconds between stalls
    jitter_until: float | None = None,  # stalls stop after this time
    gaps: tuple[tuple[float, float], ...] = (),  # (start, length): guest paused
    seed: int = 0,
    config: PlayoutConfig | None = None,
) -> tuple[Playout, SimResult]:
    rng = random.Random(seed)
    playout = Playout(rate, config or PlayoutConfig())
    result = SimResult()
    guest_rate = rate * (1 + skew)
    # Sound card state: seconds of audio (at nominal rate) buffered.
    buffered = 0.0
    playing = False
    play_rate = 1.0  # nominal seconds played per second
    clock = 0.0  # last time the card was advanced
    stall_end = 0.0
    next_stall = rng.expovariate(1 / stall_every) if jitter else float("inf")
    last_arrival = 0.0
    produced = 0
    gap_shift = 0.0
    gaps_left = list(gaps)
    pending: list[float] = []  # underruns not yet known not to be a pause

    def advance(to: float) -> None:
        nonlocal buffered, playing, clock
        if playing:
            buffered -= (to - clock) * play_rate
            if buffered < 0:
                pending.append(to + buffered / play_rate)
                buffered = 0.0
                playing = False
                playout.stopped()
        clock = to

    while True:
        produced += chunk_frames
        ideal = produced / guest_rate + gap_shift
        if gaps_left and ideal >= gaps_left[0][0]:
            gap_shift += gaps_left[0][1]
            ideal += gaps_left[0][1]
            gaps_left.pop(0)
        if ideal > seconds:
            break
        arrival = ideal + rng.uniform(0, 0.0005)
        if jitter and (jitter_until is None or ideal < jitter_until):
            while ideal > next_stall + jitter:
                next_stall += rng.expovariate(1 / stall_every)
            if ideal >= next_stall:
                stall_end = max(stall_end, next_stall + rng.uniform(0, jitter))
                next_stall += jitter + rng.expovariate(1 / stall_every)
        arrival = max(arrival, stall_end, last_arrival)
        last_arrival = arrival
        # Timers the owner would run between arrivals.
        deadline = playout.deadline()
        if deadline is not None and deadline < arrival:
            advance(deadline)
            if playout.expire(deadline):
                result.pauses.append(deadline)
                pending.clear()
        advance(arrival)
        for when in pending:
            playout.underrun(arrival)
            result.underruns.append(when)
        pending.clear()
        playout.arrival(arrival, chunk_frames, buffered if playing else None)
        result.times.append(arrival)
        result.levels.append(buffered if playing else float("nan"))
        result.targets.append(playout.target)
        result.corrections.append(playout.drift.correction)
        buffered += chunk_frames / rate
        if not playing and buffered >= playout.prebuffer:
            playing = True
        new_rate = playout.rate_changed(arrival)
        if new_rate is not None:
            play_rate = new_rate / rate
    return playout, result
