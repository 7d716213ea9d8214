"""The coordinator's predictor service: batched predictions in a worker process, the completion
history, automatic recalibration swapping in a new predictor, and a fresh worker after a crash."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import prediction_worker
from orchestrator.errors import Unavailable
from orchestrator.prediction import Predicted, PredictionService
from orchestrator.predictor import CompletionHistory, LengthPredictor, shipped_model_dir
from orchestrator.predictor.adapt import MEMORY_FILE_PREFIX, AutoAdapter
from orchestrator.predictor.errors import PredictorModelError
from orchestrator.protocol import ConversationHint

RECALIBRATION_WAIT_S = 30.0
POLL_S = 0.05


def test_predicts_records_and_adapts(tmp_path: Path) -> None:
    history_path = tmp_path / "history.sqlite"
    service = PredictionService(None, history_path, tmp_path / "adapted", adapt_every=6)

    async def run() -> list[float]:
        await service.start()
        prompts = [f"Write {n} sentences about the sea." for n in range(1, 7)]
        predicted = await asyncio.gather(*(service.predict(p, "gemma") for p in prompts))
        for item in predicted:
            service.record_completion(item, "gemma", actual_tokens=900)
        again = await predict_after_recalibration(service, prompts[0])
        await service.close()
        return [p.prediction.quantile(0.5) for p in predicted] + [again.prediction.quantile(0.5)]

    medians = asyncio.run(run())
    assert all(m > 0 for m in medians)
    with CompletionHistory(history_path) as history:
        assert history.count("gemma") == 6
    assert service.adaptations == 1
    assert medians[-1] > medians[0]  # recalibrated towards the long answers it saw
    assert len(list((tmp_path / "adapted").glob(f"{MEMORY_FILE_PREFIX}*.npy"))) == 1


async def predict_after_recalibration(service: PredictionService, prompt: str) -> Predicted:
    """Predict ``prompt`` until the worker has swapped in the recalibration running beside its
    predictions (or the wait runs out)."""
    deadline = asyncio.get_running_loop().time() + RECALIBRATION_WAIT_S
    again = await service.predict(prompt, "gemma")
    while service.adaptations == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(POLL_S)
        again = await service.predict(prompt, "gemma")
    return again


def test_a_chat_is_predicted_from_its_latest_question_and_earlier_answers() -> None:
    service = PredictionService(None, None, None, adapt_every=0)
    hint = ConversationHint(last_user="Go on.", earlier_answer_tokens=(700, 900))

    async def run() -> tuple[float, float]:
        await service.start()
        chat = await service.predict("<start_of_turn>user\n...<end_of_turn>", None, hint)
        plain = await service.predict("Go on.", None)
        await service.close()
        return chat.prediction.quantile(0.5), plain.prediction.quantile(0.5)

    chat, plain = asyncio.run(run())
    expected = LengthPredictor.load().predict("Go on.", earlier_answers=[700, 900])
    assert chat == expected.quantile(0.5) and chat > plain


def test_a_killed_worker_fails_its_batch_and_a_fresh_one_takes_over() -> None:
    service = PredictionService(None, None, None, adapt_every=0)

    async def run() -> tuple[int | None, int | None, float]:
        await service.start()
        await service.predict("Say hi.", None)
        first = service.worker_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with pytest.raises(Unavailable, match="died"):
            await service.predict("Say hi again.", None)
        again = await service.predict("Say hi.", None)
        await service.close()
        return first, service.worker_pid, again.prediction.quantile(0.5)

    first, second, median = asyncio.run(run())
    assert second not in (None, first)
    assert median == LengthPredictor.load().predict("Say hi.").quantile(0.5)
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE


def test_a_predictor_that_cannot_load_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    service = PredictionService(tmp_path, None, None, adapt_every=0)
    with pytest.raises(PredictorModelError, match=r"metadata\.json"):
        asyncio.run(service.start())


def test_a_failed_recalibration_keeps_predicting_with_the_current_predictor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "adapted"
    not_a_folder.write_text("a file where the adapted predictor would go")
    service = PredictionService(None, tmp_path / "history.sqlite", not_a_folder, adapt_every=2)

    async def run() -> list[float]:
        await service.start()
        first = await service.predict("Say hi.", None)
        for _ in range(2):
            service.record_completion(first, "gemma", actual_tokens=900)
        deadline = asyncio.get_running_loop().time() + RECALIBRATION_WAIT_S
        again = await service.predict("Say hi.", None)
        while "online adaptation failed" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, "the failure was not reported"
            await asyncio.sleep(POLL_S)
            again = await service.predict("Say hi.", None)
        await service.close()
        return [first.prediction.quantile(0.5), again.prediction.quantile(0.5)]

    with caplog.at_level(logging.ERROR, logger="edgeorch.prediction"):
        before, after = asyncio.run(run())
    assert after == before and service.adaptations == 0


def test_while_a_worker_cannot_start_again_predictions_fail_at_once_until_the_backoff_ends(
    tmp_path: Path,
) -> None:
    model = tmp_path / "predictor"
    shutil.copytree(shipped_model_dir(), model)
    backoff_s = 1.0
    service = PredictionService(model, None, None, adapt_every=0, restart_backoff_s=backoff_s)

    async def run() -> float:
        await service.start()
        model.rename(tmp_path / "moved")
        assert service.worker_pid is not None
        os.kill(service.worker_pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match="died"):
            await service.predict("Say hi.", None)
        with pytest.raises(Unavailable, match="down"):  # the start again fails: no model
            await service.predict("Say hi.", None)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable, match="down"):  # within the backoff: no new try
            await service.predict("Say hi.", None)
        assert asyncio.get_running_loop().time() - started < backoff_s / 2
        (tmp_path / "moved").rename(model)
        await asyncio.sleep(backoff_s)
        again = await service.predict("Say hi.", None)
        await service.close()
        return again.prediction.quantile(0.5)

    assert asyncio.run(run()) == LengthPredictor.load().predict("Say hi.").quantile(0.5)


def test_predictions_go_on_while_a_recalibration_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's own calls, in this process: a refit held back does not hold predictions,
    and the worker swaps the refit in once it ends."""
    release = threading.Event()
    refit = AutoAdapter.refit

    def held_refit(self: AutoAdapter) -> LengthPredictor:
        assert release.wait(RECALIBRATION_WAIT_S)
        return refit(self)

    monkeypatch.setattr(AutoAdapter, "refit", held_refit)
    prediction_worker.open_worker(None, tmp_path / "history.sqlite", tmp_path / "adapted", 2)
    try:
        asks = [prediction_worker.Ask("Say hi.", "gemma", ())]
        (first,), _, _ = prediction_worker.work(asks, [])
        answers = [prediction_worker.Completion(first.features, "gemma", 10.0, 900)] * 2
        (during,), adaptations, _ = prediction_worker.work(asks, answers)  # starts the refit
        assert adaptations == 0 and during.prediction == first.prediction
        release.set()
        deadline = time.monotonic() + RECALIBRATION_WAIT_S
        while adaptations == 0 and time.monotonic() < deadline:
            time.sleep(POLL_S)
            (after,), adaptations, _ = prediction_worker.work(asks, [])
        assert adaptations == 1
        assert after.prediction.quantile(0.5) > first.prediction.quantile(0.5)
    finally:
        release.set()
        prediction_worker.close_worker()


ORPHAN_EXIT_WAIT_S = 10.0
HOLDER = """
import asyncio, sys
from orchestrator.prediction import PredictionService

async def main() -> None:
    service = PredictionService(None, None, None, adapt_every=0)
    await service.start()
    print(service.worker_pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_worker_exits_when_the_coordinator_is_killed() -> None:
    """SIGKILL leaves the coordinator no chance to stop its worker: the worker sees its end of
    the socket close and exits instead of living on as an orphan."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        worker = psutil.Process(int(holder.stdout.readline()))
        holder.kill()
        holder.wait()
        worker.wait(ORPHAN_EXIT_WAIT_S)  # raises psutil.TimeoutExpired if it lives on
    finally:
        holder.kill()


def test_a_hung_worker_is_killed_and_its_asks_fail_instead_of_waiting_for_ever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stall_s = 1.0
    service = PredictionService(None, None, None, adapt_every=0, stall_s=stall_s)

    async def run() -> tuple[float, int | None, float]:
        await service.start()
        await service.predict("Say hi.", None)
        hung = service.worker_pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable, match="died"):
            await service.predict("Say hi again.", None)
        waited = asyncio.get_running_loop().time() - started
        again = await service.predict("Say hi.", None)
        await service.close()
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        return waited, service.worker_pid, again.prediction.quantile(0.5)

    with caplog.at_level(logging.ERROR, logger="edgeorch.prediction"):
        waited, fresh, median = asyncio.run(run())
    assert stall_s <= waited < stall_s + 5.0
    assert "unanswered" in caplog.text
    assert fresh is not None
    assert median == LengthPredictor.load().predict("Say hi.").quantile(0.5)


def test_the_worker_runs_its_linear_algebra_on_one_thread_and_leaves_ours_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    service = PredictionService(None, None, None, adapt_every=0)

    async def run() -> dict[str, str]:
        await service.start()
        assert service.worker_pid is not None
        environment = psutil.Process(service.worker_pid).environ()
        await service.close()
        return environment

    worker = asyncio.run(run())
    assert worker["OPENBLAS_NUM_THREADS"] == worker["OMP_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "4" and "OPENBLAS_NUM_THREADS" not in os.environ
