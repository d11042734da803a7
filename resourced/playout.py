"""Play-out decisions for a guest's sound: how much to buffer, and at what rate to play.

A guest sends PCM in chunks of ~10 ms, but they arrive in bursts (audio shares
the VNC socket with display updates) and by the guest's clock, which may run up
to about 1 % off the sound card's. This module decides, from the arrival times
and the buffer level the sound server reports:

- `JitterEstimator`: how late each chunk is compared with the earliest chunks
  (its *spread*), after removing the trend a clock skew puts into arrival times,
  and from that a buffer *target* that grows at once when arrivals get jittery
  and shrinks back over seconds when they calm down, between a floor and a
  ceiling.
- `DriftController`: a PI controller that steers the playback sample rate from
  the measured buffer level against the target, so that neither the level nor
  the latency drifts over hours; its correction is clamped to a few per cent and
  updated at most a few times a second. Drift is never corrected by dropping or
  inserting samples.
- `Playout`: the two together, plus pause detection: a guest that is paused
  sends nothing (and no END), so a gap longer than the buffer plus a margin is a
  pause, after which play-out starts afresh with a new prebuffer; and the
  level's bound (`limit`), past which the owner drops sound to re-sync.

This module does no I/O and never reads a clock: every time is passed in
(seconds, any monotonic origin). The PulseAudio side is `resourced.sinks.pulse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DriftController",
    "JitterEstimator",
    "Playout",
    "PlayoutConfig",
]


@dataclass(frozen=True, slots=True)
class PlayoutConfig:
    """Tuning of the jitter buffer and drift controller (seconds unless said)."""

    prebuffer: float = 0.020  # the target's floor: buffered before play starts when calm
    initial_jitter: float = 0.030  # assumed until arrivals show better (then decays)
    jitter_margin: float = 0.020  # kept on top of the largest lateness expected
    max_target: float = 0.500  # the target never grows beyond this
    jitter_hold: float = 2.0  # a spread seen is kept as the target this long...
    jitter_decay: float = 3.0  # ...then forgotten with this time constant
    max_jitter_hold: float = 30.0  # the hold doubles up to this when a burst surprises it
    hold_relax: float = 300.0  # time constant of the hold's return to jitter_hold
    rate_window: float = 20.0  # time constant of the arrival-rate regression
    baseline_rise: float = 0.002  # s/s: how fast the earliest-arrival baseline may rise
    kp: float = 0.5  # 1/s: rate correction per second of level error
    ki: float = 0.02  # 1/s^2: integral gain; the skew is fed forward, this holds the rest
    skew_prior: float = 0.3  # s^2: weight of "no skew" in the rate regression (~2 s)
    max_correction: float = 0.03  # rate correction clamp (+-3 %)
    max_catch_up: float = 0.01  # clamp of the level error's own part (+-1 %: ~17 cents)
    underrun_boost: float = 0.010  # added to the target's floor by each underrun...
    boost_decay: float = 120.0  # ...and forgotten with this time constant
    setpoint_rise: float = 0.010  # s/s: how fast the level aimed at may climb to the target
    setpoint_fall: float = 0.003  # s/s: ...and come down to it (0.3 %: inaudible)
    rate_update_interval: float = 0.25  # seconds between two rate changes at most
    pause_margin: float = 0.200  # a gap this much longer than the buffer is a pause
    overfill: float = 0.250  # the level's bound: this much (or the target again) over it

    def __post_init__(self) -> None:
        if not 0 < self.prebuffer <= self.max_target:
            raise ValueError("need 0 < prebuffer <= max_target")
        if not 0 < self.max_correction < 0.5:
            raise ValueError("max_correction must be in (0, 0.5)")


class JitterEstimator:
    """Arrival jitter of a PCM stream, detrended by its estimated rate.

    Each chunk is placed on a line fitted to (frames sent so far, arrival time)
    by exponentially weighted least squares (time constant `rate_window`); its
    residual against the lowest residual seen (the baseline, which may only rise
    slowly) is its *spread*: how much later than the earliest chunks it came.
    A clock skew only tilts the line, so it does not read as jitter.
    """

    def __init__(self, rate: int, config: PlayoutConfig = PlayoutConfig()) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.config = config
        self._frames = 0  # frames received so far
        self._offset = 0.0  # subtracted from arrival times (pauses removed)
        self._count = 0
        self._mx = 0.0  # weighted means and (co)variances of x = frames / rate, y = time
        self._my = 0.0
        self._cxx = 0.0
        self._cxy = 0.0
        self._baseline = math.inf
        self._last: float | None = None
        self._jitter = config.initial_jitter
        self._hold_until = -math.inf
        self._hold = config.jitter_hold
        self.spread = 0.0  # of the last chunk, seconds

    @property
    def slope(self) -> float:
        """Host seconds per second of the guest's nominal rate (1.0 = no skew).

        A prior (`skew_prior`, a few seconds of arrivals at slope 1) keeps the
        first, possibly jittery, chunks from tilting the line wildly.
        """
        prior = self.config.skew_prior
        slope = (self._cxy + prior) / (self._cxx + prior)
        return min(max(slope, 0.9), 1.1)

    @property
    def skew(self) -> float:
        """Estimated guest clock error: +0.01 = the guest sends 1 % fast."""
        return 1.0 / self.slope - 1.0

    @property
    def jitter(self) -> float:
        """The spread the buffer must cover now, seconds (held, then decaying)."""
        return self._jitter

    def arrival(self, now: float, frames: int) -> float:
        """A chunk of `frames` frames arrived at `now`; returns its spread."""
        if frames < 0:
            raise ValueError("frames must be >= 0")
        self._frames += frames
        x = self._frames / self.rate
        y = now - self._offset
        if self._count == 0:
            self._mx, self._my = x, y
        self._count += 1
        weight = -math.expm1(-(frames / self.rate) / self.config.rate_window)
        dx = x - self._mx
        dy = y - self._my
        self._mx += weight * dx
        self._my += weight * dy
        self._cxx = (1 - weight) * (self._cxx + weight * dx * dx)
        self._cxy = (1 - weight) * (self._cxy + weight * dx * dy)
        residual = (y - self._my) - self.slope * (x - self._mx)
        if self._last is not None:
            self._baseline += self.config.baseline_rise * max(0.0, now - self._last)
        self._baseline = min(self._baseline, residual)
        self.spread = residual - self._baseline
        self._update_jitter(now, self.spread)
        self._last = now
        return self.spread

    @property
    def hold(self) -> float:
        """How long a spread is held now, seconds (grows after surprises)."""
        return self._hold

    def _update_jitter(self, now: float, spread: float) -> None:
        config = self.config
        if self._last is not None:
            relax = math.exp(-max(0.0, now - self._last) / config.hold_relax)
            self._hold = config.jitter_hold + (self._hold - config.jitter_hold) * relax
        if spread >= self._jitter:
            # A burst that finds the target already shrunk means it was let go
            # too early: bursts come farther apart than the hold, so hold longer.
            if now > self._hold_until and spread > self._jitter + 0.002:
                self._hold = min(2 * self._hold, config.max_jitter_hold)
            self._jitter = spread
            self._hold_until = now + self._hold
        elif now > self._hold_until and self._last is not None:
            since = now - max(self._last, self._hold_until)
            decayed = self._jitter * math.exp(-since / self.config.jitter_decay)
            self._jitter = max(spread, decayed)

    def resume(self, now: float) -> None:
        """Arrivals start again after a pause: the gap is not lateness.

        The next chunk counts as on time; rate and jitter estimates are kept.
        """
        if self._count == 0:
            return
        x = self._frames / self.rate
        predicted = self._my + self.slope * (x - self._mx) + self._baseline
        self._offset += (now - self._offset) - predicted
        self._last = now


class DriftController:
    """PI controller from buffer-level error to a playback rate correction.

    `correction` c means: play at nominal x (1 + c). A positive error (more
    buffered than wanted) speeds play-out up. The loop is an integrator (the
    level integrates the rate difference), so with `kp` = 2w and `ki` = w^2 it
    is critically damped at w = kp / 2. The proportional part is clamped to
    `max_catch_up`, so that refilling or draining the buffer after the target
    moved never bends the pitch by more than that. `feedforward` (the skew the arrival
    times show, set by the owner) is added so the loop need not wait for the
    buffer to drift before following a skew; the integral term then holds only
    what the arrival clock does not show (the sound card's own clock error).
    The output is clamped, and the integral stops growing while it is
    (anti-windup).
    """

    def __init__(self, config: PlayoutConfig = PlayoutConfig()) -> None:
        self.config = config
        self.feedforward = 0.0
        self.integral = 0.0
        self.correction = 0.0
        self._last: float | None = None
        self._error_sum = 0.0
        self._error_count = 0

    def observe(self, error: float) -> None:
        """One level error sample (seconds; measured - target)."""
        self._error_sum += error
        self._error_count += 1

    def update(self, now: float) -> bool:
        """Fold the errors observed since the last update in; True if it ran.

        Runs at most every `rate_update_interval` seconds, on the mean error.
        """
        if self._error_count == 0:
            return False
        if self._last is not None and now - self._last < self.config.rate_update_interval:
            return False
        dt = self.config.rate_update_interval if self._last is None else now - self._last
        dt = min(dt, 4 * self.config.rate_update_interval)  # after a gap, no big kick
        self._last = now
        error = self._error_sum / self._error_count
        self._error_sum = 0.0
        self._error_count = 0
        limit = self.config.max_correction
        catch_up = self.config.max_catch_up
        proportional = min(max(self.config.kp * error, -catch_up), catch_up)
        integral = self.integral + self.config.ki * error * dt
        output = self.feedforward + proportional + integral
        if -limit <= output <= limit:
            self.integral = integral
        else:
            output = min(max(output, -limit), limit)
        self.integral = min(max(self.integral, -limit), limit)
        self.correction = output
        return True

    def hold(self) -> None:
        """Playback stopped (pause, underrun): drop pending samples, keep the integral."""
        self._error_sum = 0.0
        self._error_count = 0
        self._last = None
        limit = self.config.max_correction
        self.correction = min(max(self.feedforward + self.integral, -limit), limit)


class Playout:
    """The play-out of one stream: jitter target, drift correction, pauses.

    The owner calls `arrival(now, frames, level)` for every chunk, with the
    buffer level the sound server reports just before the chunk is queued
    (seconds of audio not yet played, or None while nothing plays yet); it
    applies `sample_rate` when `rate_changed(now)` says so, and `target` /
    `prebuffer` to its buffer sizes. It arms a timer for `deadline()` and calls
    `expire(now)` then: True means the guest paused.
    """

    def __init__(self, rate: int, config: PlayoutConfig = PlayoutConfig()) -> None:
        self.rate = rate
        self.config = config
        self.jitter = JitterEstimator(rate, config)
        self.drift = DriftController(config)
        self.paused = False
        self._last_arrival: float | None = None
        self._applied_rate = rate
        # The level the controller aims at: where play (re)started, moving
        # toward the target at a bounded pace, so that neither a prebuffer
        # the server rounded nor a target that moved bends the pitch much.
        self.setpoint: float | None = None
        # Underruns the jitter did not foretell (the server pulls in bigger
        # blocks than assumed, e.g. PipeWire's graph quantum; or it is starved
        # of CPU) raise the floor for a while.
        self._boost = 0.0
        self._boost_time = 0.0

    @property
    def target(self) -> float:
        """Buffer level wanted just before an on-time chunk is queued, seconds."""
        config = self.config
        wanted = max(config.prebuffer, self.jitter.jitter + config.jitter_margin) + self._boost
        return min(wanted, config.max_target)

    @property
    def limit(self) -> float:
        """The most the buffer may hold, seconds: past it the owner re-syncs
        (drops sound until the level is back at the target)."""
        target = self.target
        return target + max(target, self.config.overfill)

    @property
    def prebuffer(self) -> float:
        """What to buffer before (re)starting play, seconds."""
        return self.target

    @property
    def sample_rate(self) -> int:
        """The playback rate to ask for: nominal x (1 + correction), whole Hz."""
        return max(1, round(self.rate * (1.0 + self.drift.correction)))

    def arrival(self, now: float, frames: int, level: float | None) -> None:
        """A chunk of `frames` frames arrived at `now`; `level` as described above."""
        if self.paused:
            self.paused = False
            self.jitter.resume(now)
            self.drift.hold()
        since = 0.0 if self._last_arrival is None else now - self._last_arrival
        self._last_arrival = now
        if self._boost:
            self._boost *= math.exp(-(now - self._boost_time) / self.config.boost_decay)
            self._boost_time = now
        spread = self.jitter.arrival(now, frames)
        self.drift.feedforward = self.jitter.skew
        if level is None:
            self.setpoint = None
            return
        # A late chunk finds the buffer low by exactly its lateness; adding the
        # spread back gives the level an on-time chunk would have found, so
        # jitter does not shake the rate.
        on_time = level + spread
        target = self.target
        if self.setpoint is None:
            # Where play (re)started, which is about the prebuffer; never more
            # than the target (a burst just written is not a level to keep).
            self.setpoint = min(on_time, target)
        elif self.setpoint < target:
            self.setpoint = min(target, self.setpoint + self.config.setpoint_rise * since)
        else:
            self.setpoint = max(target, self.setpoint - self.config.setpoint_fall * since)
        self.drift.observe(on_time - self.setpoint)

    def rate_changed(self, now: float) -> int | None:
        """The new sample rate to apply now, or None (unchanged or too soon)."""
        if not self.drift.update(now):
            return None
        rate = self.sample_rate
        if rate == self._applied_rate:
            return None
        self._applied_rate = rate
        return rate

    def underrun(self, now: float) -> None:
        """The card ran dry while data kept coming: buffer more for a while."""
        if self._boost:
            self._boost *= math.exp(-(now - self._boost_time) / self.config.boost_decay)
        self._boost = min(self._boost + self.config.underrun_boost, self.config.max_target)
        self._boost_time = now
        self.stopped()

    def stopped(self) -> None:
        """Playback stopped (underrun or end): the controller holds its estimate."""
        self.drift.hold()
        self.setpoint = None

    def deadline(self) -> float | None:
        """When, without another chunk, the stream counts as paused."""
        if self._last_arrival is None or self.paused:
            return None
        return self._last_arrival + self.target + self.config.pause_margin

    def expire(self, now: float) -> bool:
        """Check the pause deadline; True if the stream has just paused."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self.paused = True
        self.drift.hold()
        self.setpoint = None
        return True
