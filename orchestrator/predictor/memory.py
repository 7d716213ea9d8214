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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from orchestrator.predictor.errors import PredictorModelError

Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(queries (n, d), keys (m, d)) float32 -> (n, m) dot products."""

MEMORY_FILE: Final = "memory.npy"
"""float16 (prompts, embedding_dim + 1): unit-norm embeddings, then the residual column."""
SIMILARITY_FILE: Final = "similarity.onnx"
"""The dot products of queries with the stored keys as an ONNX graph (both are inputs, so it
serves the deployment's memory too): onnxruntime's GEMM on one thread, 2x (one prompt) to 7x
(64 prompts) faster than numpy's einsum."""
NEIGHBOURS: Final = 20
"""Stored prompts consulted per prediction (the most similar ones)."""
SIMILARITY_FLOOR: Final = 0.7
"""Cosine similarity at or below which a stored prompt has no say; above it a neighbour
weighs ((similarity - floor) / (1 - floor)) ** 2, so near-duplicates dominate."""
PRIOR_WEIGHT: Final = 1.0
"""Weight of 'no correction' beside the neighbours': one exact duplicate moves a prediction
half-way to its residual, many close neighbours nearly all the way."""
SIMILARITY_OPSET: Final = 17
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

    def correction(
        self, embeddings: np.ndarray, similarity: Similarity | None = None
    ) -> np.ndarray:
        """(n,) log1p-token shift for each embedding row: 0 where no stored prompt is
        similar, else the similarity-weighted mean residual shrunk by PRIOR_WEIGHT.

        ``similarity(queries, keys)`` gives the (n, m) dot products; the default runs in
        numpy's einsum, several times slower than a GEMM but on one core (through BLAS,
        OpenBLAS would use every core and leave its threads spinning for ~0.1 s after
        each prediction). `LengthPredictor` passes its one-thread onnxruntime GEMM."""
        queries = _unit_rows(np.asarray(embeddings, dtype=np.float32))
        shift = np.zeros(len(queries))
        if len(self.keys) == 0:
            return shift
        dot = similarity or _einsum_similarity
        k = min(NEIGHBOURS, len(self.keys))
        for start in range(0, len(queries), QUERY_CHUNK):
            rows = slice(start, start + QUERY_CHUNK)
            sims = dot(queries[rows], self.keys)
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


def write_similarity_onnx(path: Path) -> None:
    """Write the similarity graph: similarity = queries @ transpose(keys) (needs onnx)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["keys"], ["keys_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["queries", "keys_t"], ["similarity"]),
        ],
        "memory_similarity",
        [
            helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["n", "d"]),
            helper.make_tensor_value_info("keys", TensorProto.FLOAT, ["m", "d"]),
        ],
        [helper.make_tensor_value_info("similarity", TensorProto.FLOAT, ["n", "m"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SIMILARITY_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _einsum_similarity(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.einsum("nd,md->nm", queries, keys)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
