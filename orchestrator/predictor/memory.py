"""A memory of answered prompts: how far each one's answer landed from the head's prediction.

Why: the ridge head is linear in the prompt's embedding, so a kind of prompt whose answers
run longer or shorter than its neighbourhood's trend stays mispredicted however often it is
seen. The memory keeps each answered prompt's embedding and residual (actual minus predicted
log1p length); a new prompt's prediction moves by the similarity-weighted mean residual of
its nearest stored prompts, and not at all when none is similar. Over the training prompts'
own residuals this raised Kendall tau on prompts no part of the model trained on (ShareGPT
first turns 0.261 -> 0.278, WildChat 0.280 -> 0.292, alpaca_eval 0.457 -> 0.465;
docs/PREDICTOR_RESULTS.md), where the constants below were chosen on alpaca_eval and Code
Alpaca only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from orchestrator.predictor.errors import PredictorModelError

MEMORY_FILE: Final = "memory.npy"
"""float16 (prompts, embedding_dim + 1): unit-norm embeddings, then the residual column."""
NEIGHBOURS: Final = 20
"""Stored prompts consulted per prediction (the most similar ones)."""
SIMILARITY_FLOOR: Final = 0.7
"""Cosine similarity at or below which a stored prompt has no say; above it a neighbour
weighs ((similarity - floor) / (1 - floor)) ** 2, so near-duplicates dominate."""
PRIOR_WEIGHT: Final = 1.0
"""Weight of 'no correction' beside the neighbours': one exact duplicate moves a prediction
half-way to its residual, many close neighbours nearly all the way."""
QUERY_CHUNK: Final = 64
"""Prompts compared with the memory at once (bounds the similarity matrix's memory)."""


@dataclass(frozen=True)
class NeighbourMemory:
    """Unit-norm prompt embeddings and their residuals in log1p tokens."""

    keys: np.ndarray  # (m, d) float32, rows of norm 1
    residuals: np.ndarray  # (m,) float32

    @classmethod
    def of(cls, embeddings: np.ndarray, residuals: np.ndarray) -> NeighbourMemory:
        """A memory of these prompts (embeddings need not be normalised)."""
        keys = np.asarray(embeddings, dtype=np.float32)
        if keys.ndim != 2 or len(keys) != len(residuals):
            raise ValueError(f"{keys.shape} embeddings for {len(residuals)} residuals")
        return cls(_unit_rows(keys), np.asarray(residuals, dtype=np.float32))

    def correction(self, embeddings: np.ndarray) -> np.ndarray:
        """(n,) log1p-token shift for each embedding row: 0 where no stored prompt is
        similar, else the similarity-weighted mean residual shrunk by PRIOR_WEIGHT."""
        queries = _unit_rows(np.asarray(embeddings, dtype=np.float32))
        shift = np.zeros(len(queries))
        if len(self.keys) == 0:
            return shift
        k = min(NEIGHBOURS, len(self.keys))
        for start in range(0, len(queries), QUERY_CHUNK):
            rows = slice(start, start + QUERY_CHUNK)
            # einsum's own loops, not BLAS: OpenBLAS would run this product on every core
            # and leave its threads spinning for ~0.1 s after each prediction.
            sims = np.einsum("id,md->im", queries[rows], self.keys)
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            near = np.take_along_axis(sims, top, axis=1).astype(np.float64)
            weights = np.clip((near - SIMILARITY_FLOOR) / (1.0 - SIMILARITY_FLOOR), 0.0, None)
            weights **= 2
            pulled = (weights * self.residuals[top]).sum(axis=1)
            shift[rows] = pulled / (weights.sum(axis=1) + PRIOR_WEIGHT)
        return shift

    def save(self, path: Path) -> None:
        """Write as one float16 .npy (byte for byte the same for the same memory)."""
        packed = np.hstack([self.keys, self.residuals[:, None]]).astype(np.float16)
        np.save(path, packed, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> NeighbourMemory:
        """Read what `save` wrote; PredictorModelError when it is not that."""
        try:
            packed = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PredictorModelError(f"{path}: unreadable neighbour memory: {exc}") from None
        if packed.ndim != 2 or packed.shape[1] < 2:
            raise PredictorModelError(
                f"{path}: neighbour memory of shape {packed.shape}, expected "
                "(prompts, embedding width + 1)"
            )
        packed = packed.astype(np.float32)
        return cls(_unit_rows(packed[:, :-1]), packed[:, -1].copy())


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
