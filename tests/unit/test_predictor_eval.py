"""Evaluation metrics and the eval / predict CLI on a fixture file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli import main as edgeorch_main
from orchestrator.predictor import cli
from orchestrator.predictor.data import load_records, parse_records
from orchestrator.predictor.errors import PredictorDataError
from orchestrator.predictor.evaluate import evaluate_records, kendall_tau_b, spearman
from orchestrator.predictor.model import LengthPredictor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_kendall_tau_b_known_values() -> None:
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Hand-computed: pairs (1,2)C (1,3)C (2,3)D -> (2-1)/3.
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # With ties: x=[1,1,2], y=[1,2,3]: n0=3, tx=1, ty=0, C=2, D=0 -> 2/sqrt(2*3).
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(6))


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_evaluate_fixture_file() -> None:
    predictor = LengthPredictor.load()
    records = load_records(FIXTURES / "predictor_eval.jsonl")
    result = evaluate_records(predictor, records, latency_samples=20)
    assert result.n == 60
    assert -1.0 <= result.kendall_tau <= 1.0 and result.kendall_tau > 0.1
    assert result.mae_tokens > 0
    assert 0 < result.p50_ms <= result.p99_ms


def test_bad_length_files_raise_value_errors(tmp_path: Path) -> None:
    with pytest.raises(PredictorDataError):
        parse_records([])
    with pytest.raises(ValueError, match="output_tokens"):
        parse_records(['{"prompt": "x", "output_tokens": "many"}'])
    with pytest.raises(ValueError, match="prompt"):
        parse_records(['{"output_tokens": 3}'])
    with pytest.raises(ValueError, match="not JSON"):
        parse_records(["{"])
    with pytest.raises(PredictorDataError):
        load_records(tmp_path / "missing.jsonl")


def test_cli_eval_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "eval",
            "--data",
            str(FIXTURES / "predictor_eval.jsonl"),
            "--json",
            "--latency-samples",
            "10",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"n", "kendall_tau", "spearman", "mae_tokens", "p50_ms", "p99_ms"}
    assert out["n"] == 60


def test_cli_predict_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predictor", "predict", "Write a haiku about autumn.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"expected_tokens", "p50", "p90"} <= set(out)
    assert 0 < out["p50"] <= out["p90"]


def test_cli_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["eval", "--data", str(empty), "--json"]) == 2
    assert "no records" in capsys.readouterr().err


def test_edgeorch_predictor_eval_refuses_a_bad_length_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    for path, reason in ((tmp_path / "missing.jsonl", "cannot read"), (bad, "output_tokens")):
        assert edgeorch_main(["predictor", "eval", "--data", str(path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("edgeorch: invalid_request:") and reason in error
        assert "Traceback" not in error
