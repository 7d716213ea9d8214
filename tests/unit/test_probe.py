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
    speed = probe.measure_speed(fake_engine())
    assert [c for c, _ in speed.decode_curve] == [1, 4, 8]
    rates = [tps for _, tps in speed.decode_curve]
    assert rates[0] < rates[1] < rates[2]
    assert speed.decode_tps == pytest.approx(300.0, rel=0.3)


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
