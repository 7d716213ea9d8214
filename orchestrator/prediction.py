"""The coordinator's predictor service: length predictions, the completion history and online
adaptation, all on one worker thread so the event loop never waits on onnxruntime or SQLite.

Prompts submitted close together are predicted in one batch. Every completed request is
recorded (the prompt's feature vector, the served model, predicted and actual tokens); every
``adapt_every`` new records the predictor is recalibrated for the served model from that
history and swapped in.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from orchestrator.predictor import CompletionHistory, LengthPrediction, LengthPredictor
from orchestrator.predictor.adapt import AutoAdapter
from orchestrator.protocol import ConversationHint

log = logging.getLogger("edgeorch.prediction")

MAX_BATCH: Final = 64


@dataclass(frozen=True, slots=True)
class Predicted:
    """A prediction and the feature vector the history stores when the request completes."""

    prediction: LengthPrediction
    features: np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True, slots=True)
class _Pending:
    text: str
    model: str | None
    earlier_answers: tuple[int, ...]
    future: asyncio.Future[Predicted]


@dataclass(frozen=True, slots=True)
class _Completion:
    features: np.ndarray[Any, np.dtype[np.float32]]
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
    ) -> None:
        self._predictor_dir = predictor_dir
        self._history_path = history_path
        self._adapted_dir = adapted_dir
        self._adapt_every = adapt_every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor")
        self._predictor: LengthPredictor | None = None
        self._history: CompletionHistory | None = None
        self._adapter: AutoAdapter | None = None
        self._pending: list[_Pending] = []
        self._completions: list[_Completion] = []
        self._flushing: asyncio.Task[None] | None = None
        self.adaptations = 0

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        self._predictor = LengthPredictor.load(self._predictor_dir, threads=1)
        if self._history_path is not None:
            self._history_path.parent.mkdir(parents=True, exist_ok=True)
            self._history = CompletionHistory(self._history_path)
            if self._adapt_every > 0 and self._adapted_dir is not None:
                self._adapter = AutoAdapter(
                    self._history, self._adapted_dir, self._adapt_every, base=self._predictor
                )
        log.info(
            "length predictor loaded from %s; history %s; adapting every %s completions",
            self._predictor.model_dir,
            self._history_path or "off",
            self._adapt_every if self._adapter else "never",
        )

    async def predict(
        self, prompt: str, model: str | None, conversation: ConversationHint | None = None
    ) -> Predicted:
        """The prediction for ``prompt``, or for a chat from its latest user message and
        the lengths of the assistant's earlier answers when the request carries them."""
        future: asyncio.Future[Predicted] = asyncio.get_running_loop().create_future()
        if conversation is not None:
            prompt, earlier = conversation.last_user, conversation.earlier_answer_tokens
        else:
            earlier = ()
        self._pending.append(_Pending(prompt, model, earlier, future))
        self._kick()
        return await future

    def record_completion(self, predicted: Predicted, model: str, actual_tokens: int) -> None:
        """Queue a completed request for the history (written on the worker thread)."""
        if self._history is None:
            return
        self._completions.append(
            _Completion(
                predicted.features, model, predicted.prediction.quantile(0.5), actual_tokens
            )
        )
        self._kick()

    def _kick(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or self._completions:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            completions, self._completions = self._completions, []
            try:
                results = await loop.run_in_executor(self._executor, self._work, batch, completions)
            except Exception as exc:
                log.exception("length prediction failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    def _work(self, batch: list[_Pending], completions: list[_Completion]) -> list[Predicted]:
        if self._history is not None and completions:
            for c in completions:
                self._history.record(c.features, c.model, c.predicted_tokens, c.actual_tokens)
            self._maybe_adapt()
        assert self._predictor is not None
        results: list[Predicted | None] = [None] * len(batch)
        by_model: dict[str | None, list[int]] = defaultdict(list)
        for index, pending in enumerate(batch):
            by_model[pending.model].append(index)
        for model, indices in by_model.items():
            predictions, features = self._predictor.predict_with_features(
                [batch[i].text for i in indices],
                model,
                [batch[i].earlier_answers for i in indices],
            )
            for row, index in enumerate(indices):
                results[index] = Predicted(predictions[row], features[row])
        return [r for r in results if r is not None]

    def _maybe_adapt(self) -> None:
        if self._adapter is None:
            return
        try:
            adapted = self._adapter.maybe_adapt()
        except Exception:
            log.exception("online adaptation failed; keeping the current predictor")
            return
        if adapted is not None:
            self._predictor = adapted
            self.adaptations += 1
            log.info("predictor recalibrated from %d completions", self._adapter.history.count())

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._history is not None:
            self._history.close()
