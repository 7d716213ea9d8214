"""The length predictor's worker process: it loads the predictor, the completion history and
the online adaptation, and answers the coordinator's asks over a socket pair
(``multiprocessing.connection`` frames). The coordinator's side is ``orchestrator.prediction``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import numpy as np

from orchestrator.errors import InternalError
from orchestrator.predictor import CompletionHistory, LengthPrediction, LengthPredictor
from orchestrator.predictor.adapt import AutoAdapter

MAX_BATCH: Final = 64
"""Prompts the worker predicts in one call at most."""

Features = np.ndarray[Any, np.dtype[np.float32]]
Settings = tuple[Path | None, Path | None, Path | None, int]
"""The predictor folder, history file, adapted predictor's folder and refit interval."""


@dataclass(frozen=True, slots=True)
class Predicted:
    """A prediction and the feature vector the history stores when the request completes."""

    prediction: LengthPrediction
    features: Features


@dataclass(frozen=True, slots=True)
class Ask:
    """One prompt to predict, as it crosses to the worker process."""

    text: str
    model: str | None
    earlier_answers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Completion:
    """A completed request, as it crosses to the worker for the history."""

    features: Features
    model: str
    predicted_tokens: float
    actual_tokens: int


@dataclass(slots=True)
class WorkerState:
    """What the worker process holds between calls."""

    predictor: LengthPredictor
    history: CompletionHistory | None
    adapter: AutoAdapter | None
    refitter: ThreadPoolExecutor
    """Runs recalibrations beside the predictions: a refit over a full history takes seconds,
    which no prediction should wait for (both spend their time in native code that releases
    the interpreter lock)."""
    refit: Future[LengthPredictor] | None = None
    adaptations: int = 0
    adaptation_error: str | None = None


_worker: WorkerState | None = None
"""The worker process's state (None in the coordinator's own process)."""


def serve(connection: Connection, settings: Settings) -> None:
    """The worker process: load the predictor, then answer asks until the coordinator says
    close or its end of the socket closes (it exited, or was killed). Each turn takes every
    ask that has arrived, up to ``MAX_BATCH``, as one batch: the worker never idles while an
    ask waits, and a batch holds all that came in while the last one ran."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops it on Ctrl-C
    try:
        pid, model_dir = open_worker(*settings)
    except Exception as exc:
        connection.send(("failed", _picklable(exc)))
        return
    connection.send(("ready", pid, model_dir))
    asks: deque[tuple[int, Ask]] = deque()
    completions: list[Completion] = []
    try:
        while True:
            while not asks or connection.poll():
                message = connection.recv()
                if message[0] == "close":
                    return
                _, more_asks, more_completions = message
                asks.extend(more_asks)
                completions.extend(more_completions)
            batch = [asks.popleft() for _ in range(min(MAX_BATCH, len(asks)))]
            tickets = [ticket for ticket, _ in batch]
            try:
                results, adaptations, error = work([ask for _, ask in batch], completions)
            except Exception as exc:
                connection.send(("error", tickets, f"{type(exc).__name__}: {exc}"))
            else:
                connection.send(("done", tickets, results, adaptations, error))
            completions = []
    except (EOFError, OSError):
        return  # the coordinator is gone
    finally:
        close_worker()
        connection.close()


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it crosses to the coordinator intact, else its text in an InternalError."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return InternalError(f"{type(exc).__name__}: {exc}")
    return exc


def open_worker(
    predictor_dir: Path | None,
    history_path: Path | None,
    adapted_dir: Path | None,
    adapt_every: int,
) -> tuple[int, str]:
    global _worker
    predictor = LengthPredictor.load(predictor_dir, threads=1)
    history = adapter = None
    if history_path is not None:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history = CompletionHistory(history_path)
        if adapt_every > 0 and adapted_dir is not None:
            adapter = AutoAdapter(history, adapted_dir, adapt_every, base=predictor)
    _worker = WorkerState(predictor, history, adapter, ThreadPoolExecutor(1, "recalibration"))
    return multiprocessing.current_process().pid or 0, str(predictor.model_dir)


def work(asks: list[Ask], completions: list[Completion]) -> tuple[list[Predicted], int, str | None]:
    """Record the completions, maybe recalibrate, then predict ``asks`` in order; returns the
    predictions, how many recalibrations the worker has made, and why this batch's failed (a
    failed recalibration keeps the current predictor)."""
    worker = _worker
    assert worker is not None, "the worker process was not opened"
    if worker.history is not None and completions:
        with worker.history.batch():
            for c in completions:
                worker.history.record(c.features, c.model, c.predicted_tokens, c.actual_tokens)
    _recalibrate(worker)
    results: list[Predicted | None] = [None] * len(asks)
    by_model: dict[str | None, list[int]] = defaultdict(list)
    for index, ask in enumerate(asks):
        by_model[ask.model].append(index)
    for model, indices in by_model.items():
        predictions, features = worker.predictor.predict_with_features(
            [asks[i].text for i in indices], model, [asks[i].earlier_answers for i in indices]
        )
        for row, index in enumerate(indices):
            results[index] = Predicted(predictions[row], features[row])
    error, worker.adaptation_error = worker.adaptation_error, None
    return [r for r in results if r is not None], worker.adaptations, error


def _recalibrate(worker: WorkerState) -> None:
    """Swap in a finished recalibration, and start the next one when it is due."""
    refit = worker.refit
    if refit is not None and refit.done():
        worker.refit = None
        try:
            worker.predictor = refit.result()
        except Exception as exc:
            worker.adaptation_error = f"{type(exc).__name__}: {exc}"
        else:
            worker.adaptations += 1
    adapter = worker.adapter
    if adapter is not None and worker.refit is None and adapter.due():
        worker.refit = worker.refitter.submit(adapter.refit)


def close_worker() -> None:
    global _worker
    if _worker is not None:
        _worker.refitter.shutdown(wait=True)
        if _worker.history is not None:
            _worker.history.close()
    _worker = None
