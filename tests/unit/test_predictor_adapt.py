"""Adaptation lowers the error on a shifted model; the history store and auto mode work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.predictor import adapt
from orchestrator.predictor.adapt import AutoAdapter, adapt_from_history, adapt_records
from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.evaluate import evaluate_records
from orchestrator.predictor.history import CompletionHistory, prompt_fingerprint
from orchestrator.predictor.model import LengthPredictor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ADAPT_ROWS = 200
#: Smaller split for the CLI round trip, which loads the model three times.
CLI_FIT_ROWS = 120
CLI_HELD_ROWS = 60


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


def test_adaptation_lowers_error_on_shifted_model(
    predictor: LengthPredictor, tmp_path: Path
) -> None:
    records = load_records(FIXTURES / "predictor_adapt.jsonl")
    fit, held_out = records[:ADAPT_ROWS], records[ADAPT_ROWS:]
    before = evaluate_records(predictor, held_out, latency_samples=0)
    summary = adapt_records(fit, tmp_path / "adapted", predictor)
    assert "terse-model" in summary["calibrations"] and "*" in summary["calibrations"]
    adapted = LengthPredictor.load(tmp_path / "adapted")
    after = evaluate_records(adapted, held_out, latency_samples=0)
    assert after.mae_tokens < 0.7 * before.mae_tokens
    # Another model name falls back to the catch-all calibration, not the base model.
    other = adapted.predict(held_out[0].prompt, "unknown-model").quantiles[0.5]
    base = predictor.predict(held_out[0].prompt).quantiles[0.5]
    assert other != pytest.approx(base)


def test_history_store_roundtrip(tmp_path: Path) -> None:
    with CompletionHistory(tmp_path / "h.sqlite", max_rows_per_model=3) as history:
        key = prompt_fingerprint("hello")
        assert key == prompt_fingerprint("hello") and len(key) == 32
        history.record(key, "m1", 10.0, 12)
        vec = np.arange(5, dtype=np.float32)
        history.record(vec, "m1", 20.0, 25)
        for i in range(3):
            history.record(prompt_fingerprint(str(i)), "m2", 5.0, i)
        history.record("k", None, 1.0, 1)
        assert history.count() == 6 and history.count("m1") == 2
        assert history.models() == ["", "m1", "m2"]
        rows = history.records("m1")
        assert [r.actual_tokens for r in rows] == [12, 25]
        assert rows[0].features is None
        np.testing.assert_array_equal(rows[1].features, vec)
        history.record(prompt_fingerprint("x"), "m2", 5.0, 99)
        assert [r.actual_tokens for r in history.records("m2")] == [1, 2, 99], "oldest trimmed"
        with pytest.raises(ValueError):
            history.record(key, "m1", 1.0, -1)
        with pytest.raises(ValueError):
            history.record(key, "m1", float("nan"), 1)
    with CompletionHistory(tmp_path / "h.sqlite") as reopened:
        assert reopened.count() == 6


def test_a_batch_of_records_is_one_transaction_trimmed_once(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with CompletionHistory(path, max_rows_per_model=3) as history:
        with history.batch():
            for i in range(5):
                history.record(prompt_fingerprint(str(i)), "m1", 5.0, i)
            with history.batch():
                history.record("k", "m2", 1.0, 7)
            with CompletionHistory(path) as reader:
                assert reader.count() == 0, "nothing is committed before the batch ends"
        assert [r.actual_tokens for r in history.records("m1")] == [2, 3, 4]
    with CompletionHistory(path) as reopened:
        assert reopened.count() == 4


def test_adapt_from_history_and_auto_mode(predictor: LengthPredictor, tmp_path: Path) -> None:
    records = load_records(FIXTURES / "predictor_adapt.jsonl")[:60]
    preds, feats = predictor.predict_with_features([r.prompt for r in records])
    assert feats.shape == (60, predictor.history_feature_width)
    with CompletionHistory(tmp_path / "h.sqlite") as history:
        auto = AutoAdapter(history, tmp_path / "auto", every_n=50, base=predictor)
        swapped = []
        for rec, pred, vec in zip(records, preds, feats, strict=True):
            history.record(vec, rec.model, pred.quantiles[0.5], rec.output_tokens)
            new = auto.maybe_adapt()
            if new is not None:
                swapped.append(new)
        assert len(swapped) == 1
        adapted = swapped[0]
        prompt = records[0].prompt
        assert (
            adapted.predict(prompt, "terse-model").quantiles[0.5]
            < predictor.predict(prompt).quantiles[0.5]
        )
        # Fingerprint-only rows adapt too (calibration of the stored predictions).
        with CompletionHistory(tmp_path / "fp.sqlite") as fp_history:
            for rec, pred in zip(records, preds, strict=True):
                fp_history.record(
                    prompt_fingerprint(rec.prompt),
                    rec.model,
                    pred.quantiles[0.5],
                    rec.output_tokens,
                )
            summary = adapt_from_history(fp_history, tmp_path / "fp", predictor)
            assert summary["calibrations"]["terse-model"]["n_records"] == 60


def test_auto_adaptation_keeps_going_past_the_row_cap_within_its_time_share(
    predictor: LengthPredictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full history (trimmed at its cap) still adapts every N rows, and a refit that took d
    seconds is followed by none for d / time_share - d seconds."""
    records = load_records(FIXTURES / "predictor_adapt.jsonl")[:60]
    _, feats = predictor.predict_with_features([r.prompt for r in records])
    now = [0.0]
    refit = adapt.adapt_from_history

    def slow_refit(*args: Any, **kwargs: Any) -> dict[str, Any]:
        now[0] += 2.0
        return refit(*args, **kwargs)

    monkeypatch.setattr(adapt, "adapt_from_history", slow_refit)
    adapted_at = []
    with CompletionHistory(tmp_path / "h.sqlite", max_rows_per_model=30) as history:
        auto = AutoAdapter(
            history,
            tmp_path / "auto",
            every_n=5,
            base=predictor,
            time_share=0.1,
            clock=lambda: now[0],
        )
        for i in range(200):
            now[0] = max(now[0], float(i))  # a row a second
            rec = records[i % 60]
            history.record(feats[i % 60], rec.model, 10.0, rec.output_tokens)
            if auto.maybe_adapt() is not None:
                adapted_at.append(i)
        assert (history.count(), history.last_id()) == (30, 200)
    assert adapted_at == list(range(4, 200, 20))  # every 5 rows but for the time share


def test_cli_adapt_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.predictor import cli

    records = (FIXTURES / "predictor_adapt.jsonl").read_text().splitlines()
    fit, held = tmp_path / "fit.jsonl", tmp_path / "held.jsonl"
    fit.write_text("\n".join(records[:CLI_FIT_ROWS]) + "\n")
    held.write_text("\n".join(records[-CLI_HELD_ROWS:]) + "\n")
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--data", str(fit), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    args = ["eval", "--data", str(held), "--json", "--latency-samples", "0"]
    assert cli.main(args) == 0
    before = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--predictor", str(out)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["mae_tokens"] < 0.7 * before["mae_tokens"]


def test_adapting_twice_keeps_other_models(predictor: LengthPredictor, tmp_path: Path) -> None:
    records = load_records(FIXTURES / "predictor_adapt.jsonl")
    first = records[:100]
    second = [
        LengthRecord(r.prompt, r.output_tokens * 10, r.source, "verbose-model")
        for r in records[100:200]
    ]
    adapt_records(first, tmp_path / "a", predictor)
    adapt_records(second, tmp_path / "b", LengthPredictor.load(tmp_path / "a"))
    both = LengthPredictor.load(tmp_path / "b")
    assert {"terse-model", "verbose-model", "*"} <= set(both.calibrations)
    prompt = records[0].prompt
    terse = both.predict(prompt, "terse-model").quantiles[0.5]
    verbose = both.predict(prompt, "verbose-model").quantiles[0.5]
    assert verbose > 5 * terse


def test_simulated_coordinator_recalibrates_after_every_n_completions() -> None:
    """`RealEstimates` (the bench's real predictor) adapts as the coordinator does: requests
    arriving after N completions get the recalibrated prediction; a fresh copy starts over."""
    from orchestrator.lengths import RealEstimates

    rows = load_records(FIXTURES / "predictor_adapt.jsonl")[:60]
    ids = [f"r{i:03d}" for i in range(len(rows))]
    real = RealEstimates([r.prompt for r in rows], ids, scale=2.0, adapt_every=30)
    before = [real.on_arrival(i).quantile(0.5) for i in ids[30:]]
    for request_id, row in zip(ids[:30], rows[:30], strict=True):
        real.on_completion(request_id, row.output_tokens * 2)
    assert real.adaptations == 1
    after = [real.on_arrival(i).quantile(0.5) for i in ids[30:]]
    truth = [2 * r.output_tokens for r in rows[30:]]

    def mae(predicted: list[float]) -> float:
        return float(np.mean(np.abs(np.asarray(predicted) - truth)))

    assert mae(after) < mae(before)
    fresh = real.fresh()
    assert fresh.adaptations == 0 and fresh.on_arrival(ids[30]).quantile(0.5) == before[0]
    for request_id in ids[:30]:
        fresh.on_completion(request_id, 1)
    # One-token answers pull the fresh copy's prediction down; the original keeps its own.
    assert fresh.on_arrival(ids[30]).quantile(0.5) < min(before[0], after[0])
    assert real.on_arrival(ids[30]).quantile(0.5) == after[0]
