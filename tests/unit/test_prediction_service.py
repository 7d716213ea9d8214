"""The coordinator's predictor service: batched predictions off the event loop, the completion
history, and automatic recalibration swapping in a new predictor."""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator.prediction import PredictionService
from orchestrator.predictor import CompletionHistory


def test_predicts_records_and_adapts(tmp_path: Path) -> None:
    history_path = tmp_path / "history.sqlite"
    service = PredictionService(None, history_path, tmp_path / "adapted", adapt_every=6)

    async def run() -> list[float]:
        await service.start()
        prompts = [f"Write {n} sentences about the sea." for n in range(1, 7)]
        predicted = await asyncio.gather(*(service.predict(p, "gemma") for p in prompts))
        for item in predicted:
            service.record_completion(item, "gemma", actual_tokens=900)
        again = await service.predict(prompts[0], "gemma")  # runs after the records are written
        await service.close()
        return [p.prediction.quantile(0.5) for p in predicted] + [again.prediction.quantile(0.5)]

    medians = asyncio.run(run())
    assert all(m > 0 for m in medians)
    with CompletionHistory(history_path) as history:
        assert history.count("gemma") == 6
    assert service.adaptations == 1
    assert medians[-1] > medians[0]  # recalibrated towards the long answers it saw
