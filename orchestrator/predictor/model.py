"""The runtime predictor: onnxruntime sessions over the encoder and the quantile head."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.predictor.conversation import conversation_shift
from orchestrator.predictor.distribution import (
    GRID_LEVELS,
    LengthPrediction,
    distribution_from_grid,
)
from orchestrator.predictor.errors import PredictorModelError
from orchestrator.predictor.features import PromptTokenizer, cue_feature_matrix
from orchestrator.predictor.memory import NeighbourMemory, Similarity

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ADAPTATION_FILE = "adaptation.json"
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "head.onnx"
TOKENIZER_FILE = "tokenizer.json"
SHIPPED_MODEL_NAME = "length_predictor"
#: Default onnxruntime threads: one, because the coordinator shares two cores with agents.
DEFAULT_THREADS = 1


def shipped_model_dir() -> Path:
    """Where the shipped model lies: package data in a wheel, else the checkout's models/."""
    package_root = Path(__file__).resolve().parent.parent
    candidates = (
        package_root / "_models" / SHIPPED_MODEL_NAME,
        package_root.parent / "models" / SHIPPED_MODEL_NAME,
    )
    for candidate in candidates:
        if (candidate / METADATA_FILE).is_file():
            return candidate
    raise PredictorModelError(
        "shipped length predictor not found; looked in " + ", ".join(str(c) for c in candidates)
    )


@dataclass(frozen=True)
class Calibration:
    """A per-model map of the base prediction in log1p-token space.

    loc' = intercept + slope * loc; the grid's offsets around the median are replaced by
    `offsets` when given (the residual quantiles seen on the served model's completions),
    `head` (weights over [embedding, cues]) adds a refitted correction when present, and
    `memory` (the served model's own completions and their residuals after all that) moves
    a prompt towards how its near neighbours' answers turned out.
    """

    intercept: float = 0.0
    slope: float = 1.0
    offsets: tuple[float, ...] | None = None
    head: tuple[float, ...] | None = None
    head_bias: float = 0.0
    n_records: int = 0
    memory: NeighbourMemory | None = field(default=None, compare=False, repr=False)

    def to_json(self, memory_file: str | None = None) -> dict[str, Any]:
        """Plain JSON form for adaptation.json; ``memory_file`` names where `memory` was
        saved, beside it."""
        return {
            "intercept": self.intercept,
            "slope": self.slope,
            "offsets": list(self.offsets) if self.offsets is not None else None,
            "head": list(self.head) if self.head is not None else None,
            "head_bias": self.head_bias,
            "n_records": self.n_records,
            "memory": memory_file,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], folder: Path | None = None) -> Calibration:
        """Inverse of to_json (a memory file is read from ``folder``); raises
        PredictorModelError on missing fields or an unreadable memory."""
        try:
            offsets = raw.get("offsets")
            head = raw.get("head")
            memory_file = raw.get("memory")
            memory = None
            if memory_file is not None:
                if not isinstance(memory_file, str) or folder is None:
                    raise ValueError(f"memory {memory_file!r} is not a file in a folder")
                memory = NeighbourMemory.load(folder / Path(memory_file).name)
            return cls(
                intercept=float(raw["intercept"]),
                slope=float(raw["slope"]),
                offsets=tuple(float(x) for x in offsets) if offsets is not None else None,
                head=tuple(float(x) for x in head) if head is not None else None,
                head_bias=float(raw.get("head_bias", 0.0)),
                n_records=int(raw.get("n_records", 0)),
                memory=memory,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorModelError(f"bad calibration entry: {exc}") from exc


@dataclass(frozen=True)
class RawOutputs:
    """The base model's output for a batch: features and the log-quantile grid (the ONNX
    graphs', shifted by the neighbour memory)."""

    embeddings: np.ndarray  # (n, 384) float32, L2-normalised mean-pooled MiniLM
    cues: np.ndarray  # (n, N_CUE_FEATURES) float32
    log_grid: np.ndarray  # (n, len(GRID_LEVELS)) float32, log1p(tokens)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictorModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PredictorModelError(f"{path}: expected a JSON object")
    return data


class LengthPredictor:
    """Predicts the output length distribution of a prompt, in the served model's tokens.

    Load with `LengthPredictor.load()` (the shipped model) or `load(DIR)` (a trained or
    adapted folder). Thread-compatible: one instance may serve one thread at a time.
    """

    def __init__(
        self,
        model_dir: Path,
        metadata: Mapping[str, Any],
        calibrations: Mapping[str, Calibration] | None = None,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        import onnxruntime as ort

        self.model_dir = model_dir
        self.threads = threads
        self.metadata = dict(metadata)
        self.calibrations: dict[str, Calibration] = dict(calibrations or {})
        options = ort.SessionOptions()
        # Parallelism comes from running prompts side by side (each encoder call is small and
        # scales poorly inside one op), so every call uses one thread.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        for name in (ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE):
            if not (model_dir / name).is_file():
                raise PredictorModelError(f"predictor folder {model_dir} lacks {name}")
        self._encoder = ort.InferenceSession(
            str(model_dir / ENCODER_FILE), options, providers=providers
        )
        self._head = ort.InferenceSession(str(model_dir / HEAD_FILE), options, providers=providers)
        self._tokenizer = PromptTokenizer(model_dir / TOKENIZER_FILE)
        self._median_index = len(GRID_LEVELS) // 2
        self.memory: NeighbourMemory | None = None
        self._similarity: Similarity | None = None
        """The neighbour memories' dot products; None: numpy's einsum (see `correction`)."""
        memory = self.metadata.get("memory")
        if memory is not None:
            if not isinstance(memory, dict) or not all(
                isinstance(memory.get(key), str) for key in ("file", "similarity")
            ):
                raise PredictorModelError(f"{model_dir / METADATA_FILE}: bad 'memory'")
            self.memory = NeighbourMemory.load(model_dir / memory["file"])
            graph = model_dir / memory["similarity"]
            if not graph.is_file():
                raise PredictorModelError(f"predictor folder {model_dir} lacks {graph.name}")
            session = ort.InferenceSession(str(graph), options, providers=providers)

            def similarity(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
                (sims,) = session.run(None, {"queries": queries, "keys": keys})
                return np.asarray(sims)

            self._similarity = similarity
        width = int(self.metadata["embedding_dim"])
        for stored in (self.memory, *(c.memory for c in self.calibrations.values())):
            if stored is not None and stored.keys.shape[1] != width:
                raise PredictorModelError(
                    f"a neighbour memory of {stored.keys.shape[1]}-wide embeddings for "
                    f"{model_dir}, whose embeddings are {width} wide"
                )

    @classmethod
    def load(cls, path: Path | None = None, threads: int = DEFAULT_THREADS) -> LengthPredictor:
        """Load the shipped model (path None), a trained folder, or an adapted folder.

        An adapted folder holds only adaptation.json, naming its base folder (null: shipped).
        """
        folder = shipped_model_dir() if path is None else Path(path)
        if not folder.is_dir():
            raise PredictorModelError(f"predictor folder {folder} does not exist")
        calibrations: dict[str, Calibration] = {}
        if (folder / ADAPTATION_FILE).is_file():
            adaptation = _read_json(folder / ADAPTATION_FILE)
            base = adaptation.get("base")
            base_dir = shipped_model_dir() if base is None else (folder / str(base)).resolve()
            raw_cal = adaptation.get("calibrations", {})
            if not isinstance(raw_cal, dict):
                raise PredictorModelError(f"{folder / ADAPTATION_FILE}: bad 'calibrations'")
            calibrations = {str(k): Calibration.from_json(v, folder) for k, v in raw_cal.items()}
            folder = base_dir
        metadata = _read_json(folder / METADATA_FILE)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise PredictorModelError(
                f"{folder / METADATA_FILE}: format_version {metadata.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        return cls(folder, metadata, calibrations, threads=threads)

    # --- raw model -------------------------------------------------------------------------

    def raw_outputs(self, prompts: Sequence[str], with_memory: bool = True) -> RawOutputs:
        """Run the encoder and head on prompts (in their order), before any calibration; the
        grid is shifted by the neighbour memory when the model has one (``with_memory``).

        The encoder runs one prompt per call: its int8 MatMuls quantise activations with
        one scale per call, so batching would make a prompt's prediction depend on its
        batch neighbours. Unpadded single calls are also the cheapest at these lengths.
        """
        n = len(prompts)
        emb = np.zeros((n, int(self.metadata["embedding_dim"])), dtype=np.float32)

        def encode(i: int) -> None:
            ids = np.asarray([self._tokenizer.ids(prompts[i])], dtype=np.int64)
            (pooled,) = self._encoder.run(
                None, {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            )
            emb[i] = pooled[0]

        if self.threads > 1 and n > 1:
            # onnxruntime releases the GIL and its sessions take concurrent calls.
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                list(pool.map(encode, range(n)))
        else:
            for i in range(n):
                encode(i)
        cues = cue_feature_matrix(prompts)
        (log_grid,) = self._head.run(None, {"embedding": emb, "cues": cues})
        grid = np.asarray(log_grid, dtype=np.float32)
        if with_memory and self.memory is not None:
            shift = self.memory.correction(emb, self._similarity).astype(np.float32)
            grid = np.maximum(grid + shift[:, None], 0.0)
        return RawOutputs(emb, cues, grid)

    def calibration_for(self, model: str | None) -> Calibration | None:
        """The calibration that applies to `model`: its own, else the catch-all '*'."""
        if model is not None and model in self.calibrations:
            return self.calibrations[model]
        return self.calibrations.get("*")

    def calibrated_grid(self, raw: RawOutputs, model: str | None) -> np.ndarray:
        """Apply the model's calibration to the base log grid; (n, grid) float64."""
        grid = raw.log_grid.astype(np.float64)
        cal = self.calibration_for(model)
        if cal is None:
            return grid
        loc = grid[:, self._median_index]
        offsets = grid - loc[:, None] if cal.offsets is None else np.asarray(cal.offsets)[None, :]
        new_loc = cal.intercept + cal.slope * loc
        if cal.head is not None:
            feats = np.hstack([raw.embeddings, raw.cues]).astype(np.float64)
            new_loc = new_loc + feats @ np.asarray(cal.head) + cal.head_bias
        if cal.memory is not None:
            new_loc = new_loc + cal.memory.correction(raw.embeddings, self._similarity)
        return np.maximum(new_loc[:, None] + offsets, 0.0)

    # --- public API ------------------------------------------------------------------------

    def predict_batch(
        self, prompts: Sequence[str], model: str | None = None
    ) -> list[LengthPrediction]:
        """Predictions for several prompts, in order (one encoder call per prompt, the cue
        features and the head batched); identical to calling `predict` on each."""
        if isinstance(prompts, str):
            raise TypeError("predict_batch takes a sequence of prompts, not one string")
        if not prompts:
            return []
        raw = self.raw_outputs(list(prompts))
        grid = self.calibrated_grid(raw, model)
        return [distribution_from_grid(row) for row in grid]

    def predict_with_features(
        self,
        prompts: Sequence[str],
        model: str | None = None,
        earlier_answers: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[LengthPrediction], np.ndarray]:
        """Predictions plus each prompt's history feature vector (see `history_features`),
        so the coordinator can store features without running the encoder twice.

        ``earlier_answers[i]``: the token lengths of the assistant's earlier answers in the
        chat prompt i continues (oldest first); they move its prediction towards them
        (`conversation_shift`). The history features stay those of the prompt alone.
        """
        if not prompts:
            return [], np.zeros((0, self.history_feature_width), dtype=np.float32)
        raw = self.raw_outputs(list(prompts))
        grid = self.calibrated_grid(raw, model)
        if earlier_answers is not None:
            median = grid[:, self._median_index].copy()
            for i, answers in enumerate(earlier_answers):
                grid[i] += conversation_shift(float(median[i]), answers)
            grid = np.maximum(grid, 0.0)
        return [distribution_from_grid(row) for row in grid], self._history_matrix(raw)

    def history_features(self, prompt: str) -> np.ndarray:
        """[base log1p median, embedding, cues] as float32: what `CompletionHistory.record`
        stores so adaptation can refit without the prompt text."""
        return self._history_matrix(self.raw_outputs([prompt]))[0]

    @property
    def history_feature_width(self) -> int:
        """Length of a `history_features` vector."""
        return 1 + int(self.metadata["embedding_dim"]) + len(self.metadata["cue_features"])

    def _history_matrix(self, raw: RawOutputs) -> np.ndarray:
        loc = raw.log_grid[:, self._median_index : self._median_index + 1]
        return np.hstack([loc, raw.embeddings, raw.cues]).astype(np.float32)

    def base_offsets(self) -> np.ndarray:
        """The base model's quantile offsets around the median (log1p tokens)."""
        offsets = np.asarray(self.metadata["offsets"], dtype=np.float64)
        if offsets.shape != (len(GRID_LEVELS),):
            raise PredictorModelError(f"{self.model_dir / METADATA_FILE}: bad 'offsets'")
        return offsets

    def predict(
        self, prompt: str, model: str | None = None, earlier_answers: Sequence[int] = ()
    ) -> LengthPrediction:
        """Prediction for one prompt; for a chat, ``prompt`` is its latest user message and
        ``earlier_answers`` the token lengths of the assistant's answers before it."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if earlier_answers:
            return self.predict_with_features([prompt], model, [earlier_answers])[0][0]
        return self.predict_batch([prompt], model)[0]


def env_threads(default: int = DEFAULT_THREADS) -> int:
    """Thread count from EDGEORCH_PREDICTOR_THREADS, read when called (never at import)."""
    raw = os.environ.get("EDGEORCH_PREDICTOR_THREADS")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"EDGEORCH_PREDICTOR_THREADS must be an integer, got {raw!r}") from exc
    if value < 1:
        raise ValueError(f"EDGEORCH_PREDICTOR_THREADS must be >= 1, got {value}")
    return value
