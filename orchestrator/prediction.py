"""The coordinator's predictor service: length predictions, the completion history and online
adaptation, all in one worker process, so the event loop never waits on onnxruntime or SQLite
and never shares its interpreter lock with them.

Prompts submitted close together are predicted in one batch. Every completed request is
recorded (the prompt's feature vector, the served model, predicted and actual tokens; a
batch's records in one transaction); every ``adapt_every`` new records, but for at most a
tenth of the time (``ADAPT_TIME_SHARE``), the predictor is recalibrated for the served model
from that history on a thread beside the predictions, and swapped in when it is ready.

Why a process and not a thread: the encoder runs once per prompt and takes the interpreter
lock back after every call. On the control-plane benchmark a worker thread waited on the
event loop for that lock, predicting at about 0.57 of its rate alone; a process of its own
takes a core where one is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from orchestrator.errors import Unavailable
from orchestrator.predictor import CompletionHistory, LengthPrediction, LengthPredictor
from orchestrator.predictor.adapt import AutoAdapter
from orchestrator.protocol import ConversationHint

log = logging.getLogger("edgeorch.prediction")

MAX_BATCH: Final = 64
PARENT_CHECK_INTERVAL_S: Final = 1.0
"""How often the worker process checks that the coordinator still lives: a coordinator killed
with SIGKILL cannot stop it, and its queue's pipe stays open in the worker itself."""
RESTART_BACKOFF_S: Final = 5.0
"""After a failed start of the worker, how long predictions fail at once before another try."""
BATCHES_IN_FLIGHT: Final = 2
"""Batches sent to the worker before the first returns: it starts the next the moment one
ends, instead of idling while the results cross back and the next batch is gathered."""

Features = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True, slots=True)
class Predicted:
    """A prediction and the feature vector the history stores when the request completes."""

    prediction: LengthPrediction
    features: Features


@dataclass(frozen=True, slots=True)
class _Ask:
    """One prompt to predict, as it crosses to the worker process."""

    text: str
    model: str | None
    earlier_answers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Pending:
    ask: _Ask
    future: asyncio.Future[Predicted]


@dataclass(frozen=True, slots=True)
class _Completion:
    features: Features
    model: str
    predicted_tokens: float
    actual_tokens: int


class PredictionService:
    def __init__(
        self,
        predictor_dir: Path | None,
        history_path: Path | None,
        adapted_dir: Path | None,
        adapt_every: int,
        restart_backoff_s: float = RESTART_BACKOFF_S,
    ) -> None:
        self._settings = (predictor_dir, history_path, adapted_dir, adapt_every)
        self._restart_backoff_s = restart_backoff_s
        self._next_start_s = -math.inf
        self._starting = asyncio.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self.worker_pid: int | None = None
        self._pending: list[_Pending] = []
        self._completions: list[_Completion] = []
        self._flushing: set[asyncio.Task[None]] = set()
        self.adaptations = 0
        self._worker_adaptations = 0

    async def start(self) -> None:
        """Start the worker process and load the predictor there; raises what loading raises."""
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=signal.signal,
            initargs=(signal.SIGINT, signal.SIG_IGN),  # the coordinator stops it on Ctrl-C
        )
        try:
            self.worker_pid, model_dir = await asyncio.get_running_loop().run_in_executor(
                pool, _open_worker, *self._settings
            )
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._pool = pool
        self._worker_adaptations = 0
        _, history_path, adapted_dir, adapt_every = self._settings
        log.info(
            "length predictor loaded in process %d from %s; history %s; adapting every %s "
            "completions",
            self.worker_pid,
            model_dir,
            history_path or "off",
            adapt_every if history_path and adapted_dir and adapt_every > 0 else "never",
        )

    async def predict(
        self, prompt: str, model: str | None, conversation: ConversationHint | None = None
    ) -> Predicted:
        """The prediction for ``prompt``, or for a chat from its latest user message and
        the lengths of the assistant's earlier answers when the request carries them."""
        future: asyncio.Future[Predicted] = asyncio.get_running_loop().create_future()
        if conversation is not None:
            ask = _Ask(conversation.last_user, model, conversation.earlier_answer_tokens)
        else:
            ask = _Ask(prompt, model, ())
        self._pending.append(_Pending(ask, future))
        self._kick()
        return await future

    async def predict_or_none(
        self,
        request_id: str,
        prompt: str,
        model: str | None,
        conversation: ConversationHint | None = None,
    ) -> Predicted | None:
        """`predict`, or None with the reason logged: such a request is scheduled without."""
        try:
            return await self.predict(prompt, model, conversation)
        except Unavailable as exc:  # the service logged why, once
            log.debug("no length prediction for %s (%s)", request_id, exc.message)
        except Exception:
            log.exception("no length prediction for %s; scheduling it without one", request_id)
        return None

    def record_completion(self, predicted: Predicted, model: str, actual_tokens: int) -> None:
        """Queue a completed request for the history (written in the worker process)."""
        if self._settings[1] is None:
            return
        self._completions.append(
            _Completion(
                predicted.features, model, predicted.prediction.quantile(0.5), actual_tokens
            )
        )
        self._kick()

    def _kick(self) -> None:
        if len(self._flushing) < BATCHES_IN_FLIGHT:
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._completions:
            pool = self._pool or await self._restart()
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            completions, self._completions = self._completions, []
            if pool is None:
                _fail(batch, Unavailable("the length predictor's worker is down", predictor="down"))
                continue
            try:
                results, adaptations, adaptation_error = await loop.run_in_executor(
                    pool, _work, [p.ask for p in batch], completions
                )
            except BrokenProcessPool:
                log.error(
                    "the length predictor's worker %s died; %d predictions lost, starting another",
                    self.worker_pid,
                    len(batch),
                )
                _fail(batch, Unavailable("the length predictor's worker died", predictor="died"))
                if pool is self._pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                continue
            except Exception as exc:
                log.exception("length prediction failed")
                _fail(batch, exc)
                continue
            if adaptation_error is not None:
                log.error(
                    "online adaptation failed; keeping the current predictor: %s", adaptation_error
                )
            if adaptations > self._worker_adaptations:
                self.adaptations += adaptations - self._worker_adaptations
                self._worker_adaptations = adaptations
                log.info("predictor recalibrated (%d times so far)", self.adaptations)
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    async def _restart(self) -> ProcessPoolExecutor | None:
        """A fresh worker after the last one died (its history is on disk), or None while
        starting one failed less than ``restart_backoff_s`` ago: predictions asked meanwhile
        fail at once and their requests are scheduled without one."""
        loop = asyncio.get_running_loop()
        async with self._starting:
            if self._pool is None and loop.time() >= self._next_start_s:
                try:
                    await self.start()
                except Exception:
                    self._next_start_s = loop.time() + self._restart_backoff_s
                    log.exception(
                        "the length predictor's worker could not be started again; predicting "
                        "nothing for %.0f s",
                        self._restart_backoff_s,
                    )
        return self._pool

    async def close(self) -> None:
        await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._pool is None:
            return
        with contextlib.suppress(BrokenProcessPool):
            await asyncio.get_running_loop().run_in_executor(self._pool, _close_worker)
        self._pool.shutdown(wait=True)


def _fail(batch: list[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


@dataclass(slots=True)
class _Worker:
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


_worker: _Worker | None = None
"""The worker process's state (None in the coordinator's own process)."""


def _open_worker(
    predictor_dir: Path | None,
    history_path: Path | None,
    adapted_dir: Path | None,
    adapt_every: int,
) -> tuple[int, str]:
    global _worker
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent.pid,), daemon=True).start()
    predictor = LengthPredictor.load(predictor_dir, threads=1)
    history = adapter = None
    if history_path is not None:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history = CompletionHistory(history_path)
        if adapt_every > 0 and adapted_dir is not None:
            adapter = AutoAdapter(history, adapted_dir, adapt_every, base=predictor)
    _worker = _Worker(predictor, history, adapter, ThreadPoolExecutor(1, "recalibration"))
    return multiprocessing.current_process().pid or 0, str(predictor.model_dir)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os._exit(0)


def _work(
    asks: list[_Ask], completions: list[_Completion]
) -> tuple[list[Predicted], int, str | None]:
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


def _recalibrate(worker: _Worker) -> None:
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


def _close_worker() -> None:
    global _worker
    if _worker is not None:
        _worker.refitter.shutdown(wait=True)
        if _worker.history is not None:
            _worker.history.close()
    _worker = None
