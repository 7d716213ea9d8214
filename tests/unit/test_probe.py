"""Device speed probe: measured through the engine, cached per key."""

from __future__ import annotations

from pathlib import Path

import pytest

import agents.probe as probe
from agents.backends.fake.engine import FakeEngine, FakeTimingModel


def fake_engine(max_seqs: int = 8) -> FakeEngine:
    return FakeEngine(
        FakeTimingModel(decode_tps=300.0, prefill_tps=200_000.0), n_ctx=4096, max_seqs=max_seqs
    )


def test_concurrency_points_stay_within_max_seqs() -> None:
    assert probe.concurrency_points(8) == [1, 4, 8]
    assert probe.concurrency_points(1) == [1]
    assert probe.concurrency_points(32) == [1, 4, 16, 32]


def test_measured_curve_follows_the_timing_model() -> None:
    """On a virtual clock that only the engine's work advances, so load cannot move it."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    timing = FakeTimingModel(decode_tps=300.0, prefill_tps=200_000.0)
    engine = FakeEngine(timing, n_ctx=4096, max_seqs=8, sleep=sleep)
    speed = probe.measure_speed(engine, clock=lambda: now[0])
    assert [c for c, _ in speed.decode_curve] == [1, 4, 8]
    for concurrency, tps in speed.decode_curve:
        assert tps == pytest.approx(concurrency / timing.decode_step_s(concurrency), rel=0.01)
    assert speed.decode_tps == pytest.approx(300.0, rel=0.01)


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    measured = probe.SpeedProfile(prefill_tps=100.0, decode_curve=((1, 10.0), (8, 40.0)))
    monkeypatch.setattr(probe, "measure_speed", lambda engine: calls.append(engine) or measured)
    environ = {"EDGEORCH_CACHE_DIR": str(tmp_path)}
    engine = fake_engine()
    assert probe.cached_speed(engine, environ, build="b1") == measured
    assert probe.cached_speed(engine, environ, build="b1") == measured
    assert len(calls) == 1
    probe.cached_speed(engine, environ, build="other build")
    assert len(calls) == 2
