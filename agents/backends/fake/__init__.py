"""The fake backend: a deterministic engine with a timing model (tests, chaos, replays)."""

from __future__ import annotations

from collections.abc import Mapping

from agents.backends import Measured
from agents.backends.fake.engine import FakeEngine, FakeTimingModel
from agents.base import Engine
from agents.probe import SpeedProfile, concurrency_points
from orchestrator.errors import InternalError
from orchestrator.settings import AgentSettings


def build(settings: AgentSettings, environ: Mapping[str, str]) -> Engine:
    return FakeEngine(
        FakeTimingModel(decode_tps=settings.fake_decode_tps, prefill_tps=settings.fake_prefill_tps),
        n_ctx=settings.n_ctx,
        max_seqs=settings.max_seqs,
        kv_budget_tokens=settings.kv_budget_tokens,
        model_name=settings.model_name or "fake",
        crash_marker=settings.fake_crash_marker,
    )


def measure(engine: Engine, environ: Mapping[str, str]) -> Measured:
    """The timing model's speeds, at the probe's concurrency points (nothing to measure)."""
    if not isinstance(engine, FakeEngine):
        raise InternalError(f"the fake backend cannot measure a {type(engine).__name__}")
    timing = engine.timing
    curve = tuple(
        (c, round(c / timing.decode_step_s(c), 1)) for c in concurrency_points(engine.max_seqs)
    )
    return Measured(SpeedProfile(prefill_tps=timing.prefill_tps, decode_curve=curve), False)
