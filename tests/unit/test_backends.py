"""The backend registry: one name per engine package, the settings, the CLI and the wire take
their names from it, and each backend reports its own speeds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agents.backends import backend
from agents.backends.fake.engine import FakeEngine, FakeTimingModel
from agents.backends.registry import BACKEND_NAMES
from agents.device import build_engine, probe_profile
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import DeviceProfile
from orchestrator.settings import AgentSettings, load_settings
from tests.factories import profile


def test_unknown_backends_are_refused_with_the_choices() -> None:
    with pytest.raises(InvalidRequest, match="unknown backend 'vllm'; choose one of llama, fake"):
        backend("vllm")
    with pytest.raises(InvalidRequest, match=r"setting backend .*unknown backend 'vllm'"):
        load_settings(AgentSettings, config=None, environ={}, overrides={"backend": "vllm"})
    assert BACKEND_NAMES == ("llama", "fake")


def test_the_fake_backend_builds_and_reports_its_timing_model() -> None:
    settings = AgentSettings(backend="fake", max_seqs=8, fake_decode_tps=40.0)
    engine = build_engine(settings, {})
    assert isinstance(engine, FakeEngine) and engine.max_seqs == 8
    registered = probe_profile(settings, engine, {})
    timing = FakeTimingModel(decode_tps=40.0, prefill_tps=settings.fake_prefill_tps)
    assert registered.backend == "fake" and not registered.gpu_offload_supported
    assert registered.decode_tps == pytest.approx(40.0, rel=0.01)
    assert [c for c, _ in registered.decode_curve] == [1, 4, 8]
    assert registered.decode_curve[-1][1] == pytest.approx(8 / timing.decode_step_s(8), rel=0.01)


def test_the_wire_takes_backend_names_it_does_not_know_but_not_garbage() -> None:
    """A coordinator keeps working with agents of a newer backend; the name stays a name."""
    assert profile(backend="mlx-metal").backend == "mlx-metal"
    fields = profile().model_dump()
    for bad in ("", "Bad Name!", "x" * 33):
        with pytest.raises(ValidationError):
            DeviceProfile(**{**fields, "backend": bad})
