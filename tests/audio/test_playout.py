"""The play-out logic (resourced.playout) against a simulated guest, network and card.

No sound server here: `tests.audio.sim` plays the buffer by a simulated clock.
The real stream is tested in test_pulse.py.
"""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resourced.playout import DriftController, JitterEstimator, Playout, PlayoutConfig
from tests.audio.sim import SimResult, simulate


def _levels_after(result: SimResult, after: float) -> list[float]:
    return [
        level
        for t, level in zip(result.times, result.levels, strict=True)
        if t >= after and not math.isnan(level)
    ]


def _targets_after(result: SimResult, after: float) -> list[float]:
    return [g for t, g in zip(result.times, result.targets, strict=True) if t >= after]


def test_steady_arrivals_keep_the_prebuffer() -> None:
    playout, result = simulate(120)
    assert result.underruns == []
    levels = _levels_after(result, 20)
    # The level before each chunk sits at the 20 ms floor, the target too.
    assert 0.018 <= statistics.median(levels) <= 0.023
    assert max(_targets_after(result, 20)) <= 0.022
    assert abs(playout.drift.correction) < 0.0005


def test_bursty_arrivals_raise_the_target_and_cause_no_underrun() -> None:
    _, result = simulate(600, jitter=0.030)
    assert result.underruns == []
    targets = _targets_after(result, 5)
    # The target covers the 30 ms bursts on top of the floor, and no more than
    # the floor plus the largest lateness (plus a chunk) ever.
    assert 0.040 <= statistics.median(targets) <= 0.052
    assert max(targets) <= 0.020 + 0.030 + 0.010
    assert 0.030 <= statistics.median(_levels_after(result, 5)) <= 0.050


def test_the_target_shrinks_back_after_jitter_stops() -> None:
    _, result = simulate(90, jitter=0.030, jitter_until=30)
    assert result.underruns == []
    before = [g for t, g in zip(result.times, result.targets, strict=True) if 20 < t < 30]
    assert statistics.median(before) > 0.040
    # Within seconds (the hold, grown to at most 30 s by bursts that came after
    # it had let go, then a 3 s decay), back near the floor.
    assert max(_targets_after(result, 75)) < 0.022
    assert statistics.median(_levels_after(result, 60)) < 0.023


@pytest.mark.parametrize("skew", [0.01, -0.01, 0.005, -0.003])
@pytest.mark.parametrize("jitter", [0.0, 0.030])
def test_clock_skew_over_hours_stays_bounded_and_the_rate_follows_it(
    skew: float, jitter: float
) -> None:
    # Two simulated hours, 20 ms chunks to keep the test quick.
    playout, result = simulate(7200, skew=skew, jitter=jitter, chunk_frames=960, seed=3)
    # With random bursts the card may run dry about once an hour (a burst
    # longer than the ones the target was holding for); steady arrivals never.
    assert len(result.underruns) <= (2 if jitter else 0)
    levels = _levels_after(result, 10)
    assert max(levels) <= 0.060 + 0.020  # bounded: target plus a chunk at most
    targets = _targets_after(result, 30)
    assert max(targets) <= 0.020 + jitter + 0.020 + 0.001
    # The last hour looks like the first minutes after settling: no creep.
    first = statistics.median(_levels_after(result, 60)[:50_000])
    last = statistics.median(_levels_after(result, 3600))
    assert abs(last - first) < 0.003
    # The rate follows the skew: on average, and its slow part at the end.
    late = [c for t, c in zip(result.times, result.corrections, strict=True) if t > 3600]
    assert statistics.fmean(late) == pytest.approx(skew, abs=0.0002)
    slow = playout.drift.feedforward + playout.drift.integral
    assert slow == pytest.approx(skew, abs=0.001 if jitter else 0.0002)
    assert playout.jitter.skew == pytest.approx(skew, abs=0.0005)


def test_skew_does_not_read_as_jitter() -> None:
    playout, result = simulate(300, skew=-0.01)
    assert max(_targets_after(result, 15)) < 0.023
    assert playout.jitter.jitter < 0.002


def test_a_pause_is_detected_counts_no_underrun_and_resumes() -> None:
    _, result = simulate(60, skew=0.01, jitter=0.010, gaps=((20, 1.0), (40, 3.0)))
    assert result.underruns == []
    assert len(result.pauses) == 2
    assert 20.0 < result.pauses[0] < 20.5
    assert 40.0 < result.pauses[1] < 40.5
    # Play resumes after each pause and the level comes back to the target.
    assert statistics.median(_levels_after(result, 50)) < 0.040


def test_starved_data_underruns() -> None:
    # The guest sends only 90 % of real time: the card must run dry, again and again,
    # even with the correction clamped at -3 %.
    _, result = simulate(30, skew=-0.10)
    assert len(result.underruns) > 10


@settings(max_examples=20, deadline=None)
@given(
    skew=st.floats(-0.01, 0.01),
    jitter=st.floats(0.0, 0.030),
    chunk_ms=st.sampled_from([5, 10, 20]),
    rate=st.sampled_from([8000, 22050, 44100, 48000]),
    seed=st.integers(0, 2**16),
)
def test_bounded_for_any_skew_and_jitter(
    skew: float, jitter: float, chunk_ms: int, rate: int, seed: int
) -> None:
    chunk = rate * chunk_ms // 1000
    _, result = simulate(120, rate=rate, chunk_frames=chunk, skew=skew, jitter=jitter, seed=seed)
    # A random burst may find the target shrunk after a calm spell, rarely.
    assert len(result.underruns) <= 1
    # The start assumes 30 ms of jitter; what is learnt is the lateness seen,
    # which is at most a burst plus a chunk.
    assert max(_targets_after(result, 0)) <= 0.020 + max(0.030, jitter + chunk_ms / 1000) + 0.002
    limit = 0.020 + jitter + chunk_ms / 1000 + 0.002
    assert max(_targets_after(result, 40)) <= limit
    assert max(_levels_after(result, 40)) <= limit + chunk_ms / 1000 + 0.005
    late = [c for t, c in zip(result.times, result.corrections, strict=True) if t > 60]
    assert statistics.fmean(late) == pytest.approx(skew, abs=0.001)


def test_the_rate_update_is_rate_limited_and_clamped() -> None:
    config = PlayoutConfig()
    drift = DriftController(config)
    drift.observe(1.0)  # a whole second too much
    assert drift.update(0.0)
    # The proportional part is held to the catch-up clamp; the integral starts.
    assert drift.correction == pytest.approx(
        config.max_catch_up + config.ki * 1.0 * config.rate_update_interval
    )
    drift.observe(1.0)
    assert not drift.update(0.1)  # too soon
    now = 0.0
    for _ in range(20):
        now += config.rate_update_interval
        drift.observe(1.0)
        assert drift.update(now)
    assert drift.correction == config.max_correction
    # Anti-windup: the integral did not run away while saturated, so it comes
    # back as soon as the error turns.
    assert abs(drift.integral) <= config.max_correction
    now += config.rate_update_interval
    drift.observe(-0.01)
    drift.update(now)
    assert drift.correction < config.max_correction


def test_playout_reports_rate_changes_in_whole_hertz() -> None:
    playout = Playout(44100)
    now = 0.0
    rates: list[int] = []
    for _ in range(3000):
        now += 0.01
        playout.arrival(now, 441, 0.060)  # 40 ms more than wanted, persistently
        rate = playout.rate_changed(now)
        if rate is not None:
            rates.append(rate)
    assert rates
    assert all(44100 < r <= 44100 * 1.03 + 1 for r in rates)
    assert len(rates) <= 30 / 0.25


def test_an_underrun_raises_the_target_for_a_while() -> None:
    playout = Playout(48000)
    now = 0.0
    for _ in range(3000):  # 30 s steady: the target is at its floor
        now += 0.01
        playout.arrival(now, 480, 0.020)
    assert playout.target == pytest.approx(0.020, abs=0.001)
    playout.underrun(now)
    assert playout.target == pytest.approx(0.030, abs=0.001)
    for _ in range(30000):  # five minutes later it is forgotten
        now += 0.01
        playout.arrival(now, 480, 0.030)
    assert playout.target == pytest.approx(0.020, abs=0.001)


def test_starved_card_buffers_more() -> None:
    # Underruns the arrivals did not foretell make the target grow.
    _, result = simulate(30, skew=-0.10)
    assert max(result.targets) >= 0.050


def test_estimator_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        JitterEstimator(0)
    with pytest.raises(ValueError, match="frames"):
        JitterEstimator(48000).arrival(0.0, -1)
    with pytest.raises(ValueError, match="prebuffer"):
        PlayoutConfig(prebuffer=0.0)


def test_the_bound_is_the_target_plus_the_larger_of_it_and_the_overfill() -> None:
    playout = Playout(48000, PlayoutConfig(initial_jitter=0.030))
    assert playout.target == pytest.approx(0.050)
    assert playout.limit == pytest.approx(0.050 + 0.250)
    wide = Playout(48000, PlayoutConfig(initial_jitter=0.400))
    assert wide.limit == pytest.approx(2 * wide.target)
    # Never seconds: at the largest target, a second at most.
    widest = Playout(48000, PlayoutConfig(initial_jitter=5.0))
    assert widest.limit == pytest.approx(2 * widest.config.max_target)
