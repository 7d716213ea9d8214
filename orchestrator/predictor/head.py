"""The quantile head: a linear map of [embedding, cues] to a log-length location, plus
fixed quantile offsets; fitting (numpy) and writing it as a small ONNX graph (onnx helper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEAD_OPSET = 17


@dataclass(frozen=True)
class LinearHead:
    """loc = embedding @ w_emb + cues @ w_cue + bias; log_grid = loc + offsets (log1p tokens)."""

    w_emb: np.ndarray  # (384,)
    w_cue: np.ndarray  # (n_cues,)
    bias: float
    offsets: np.ndarray  # (len(GRID_LEVELS),), offsets[median] == 0

    def loc(self, embeddings: np.ndarray, cues: np.ndarray) -> np.ndarray:
        """Log1p-token location (the median) for each row; float64."""
        return (
            embeddings.astype(np.float64) @ self.w_emb
            + cues.astype(np.float64) @ self.w_cue
            + self.bias
        )

    def log_grid(self, embeddings: np.ndarray, cues: np.ndarray) -> np.ndarray:
        """(n, grid) log1p-token quantiles, clipped at 0 tokens."""
        return np.maximum(self.loc(embeddings, cues)[:, None] + self.offsets[None, :], 0.0)


#: Smallest scale a 0/1 feature is standardised by (the std of a feature present in about
#: 2.3% of rows). Why: standardising a cue seen in 1 of 1,000 prompts multiplies it by ~30,
#: so the penalty barely touches it and one example sets its weight.
BINARY_SCALE_FLOOR = 0.15


def weighted_ridge(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float
) -> tuple[np.ndarray, float]:
    """Ridge regression on standardised columns, returned in raw-column units.

    Why standardise: the embedding's and the cue features' scales differ by orders of
    magnitude, and one penalty should shrink them alike; rare 0/1 cues are scaled by at
    least BINARY_SCALE_FLOOR so they are shrunk like common ones.
    """
    return ridge_path(x, y, weights, (alpha,))[0]


def ridge_path(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, alphas: Sequence[float]
) -> list[tuple[np.ndarray, float]]:
    """`weighted_ridge` at each penalty in `alphas`, sharing the standardisation and the Gram
    matrix, which cost far more than one solve (same figures as separate calls)."""
    w = weights / weights.mean()
    mean = np.average(x, axis=0, weights=w)
    scale = np.sqrt(np.average((x - mean) ** 2, axis=0, weights=w)) + 1e-6
    binary = np.all((x == 0.0) | (x == 1.0), axis=0)
    scale = np.where(binary, np.maximum(scale, BINARY_SCALE_FLOOR), scale)
    z = (x - mean) / scale
    y_mean = float(np.average(y, weights=w))
    gram = z.T @ (z * w[:, None])
    rhs = z.T @ (w * (y - y_mean))
    identity = np.eye(z.shape[1])
    fits = []
    for alpha in alphas:
        coef = np.linalg.solve(gram + alpha * identity, rhs) / scale
        fits.append((coef, y_mean - float(mean @ coef)))
    return fits


def weighted_quantile(values: np.ndarray, weights: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles of a weighted sample at `levels` (midpoint interpolation)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = (np.cumsum(w) - 0.5 * w) / w.sum()
    return np.interp(levels, cum, v)


def write_head_onnx(head: LinearHead, path: Path) -> None:
    """Write the head as ONNX: inputs `embedding` (n, d) and `cues` (n, c) float32,
    output `log_grid` (n, grid) float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, c, g = len(head.w_emb), len(head.w_cue), len(head.offsets)
    inits = [
        numpy_helper.from_array(head.w_emb.astype(np.float32).reshape(d, 1), "w_emb"),
        numpy_helper.from_array(head.w_cue.astype(np.float32).reshape(c, 1), "w_cue"),
        numpy_helper.from_array(
            (head.offsets + head.bias).astype(np.float32).reshape(1, g), "offsets_plus_bias"
        ),
        numpy_helper.from_array(np.zeros((1, 1), dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["embedding", "w_emb"], ["loc_emb"]),
        helper.make_node("MatMul", ["cues", "w_cue"], ["loc_cue"]),
        helper.make_node("Add", ["loc_emb", "loc_cue"], ["loc"]),
        helper.make_node("Add", ["loc", "offsets_plus_bias"], ["grid_raw"]),
        helper.make_node("Max", ["grid_raw", "zero"], ["log_grid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "length_head",
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", d]),
            helper.make_tensor_value_info("cues", TensorProto.FLOAT, ["n", c]),
        ],
        [helper.make_tensor_value_info("log_grid", TensorProto.FLOAT, ["n", g])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", HEAD_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
