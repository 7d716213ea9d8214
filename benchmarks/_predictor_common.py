"""Helpers shared by the predictor benchmarks (measurement only; needs the train extra)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.encoder_export import (
    build_encoder,
    embed_prompts,
    export_encoder,
    minilm_dir,
)
from orchestrator.predictor.features import PromptTokenizer, cue_feature_matrix
from orchestrator.predictor.head import write_head_onnx
from orchestrator.predictor.model import (
    ENCODER_FILE,
    METADATA_FILE,
    TOKENIZER_FILE,
    LengthPredictor,
    shipped_model_dir,
)
from orchestrator.predictor.train import (
    ENCODER_LAYERS,
    fit_head,
    group_records,
    tune_encoder,
    weighted_records,
)

SHARED_LENGTHS = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data")) / "lengths"


def shared_file(name: str) -> Path:
    """A length file of the shared data folder (EDGEORCH_SHARED_DATA, default ../shared/data)."""
    path = SHARED_LENGTHS / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: set EDGEORCH_SHARED_DATA to the shared data folder")
    return path


def median_by_prompt(records: list[LengthRecord]) -> tuple[list[str], np.ndarray]:
    """Prompts (sorted) and the median output tokens over the models that answered each."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for r in records:
        grouped[r.prompt].append(r.output_tokens)
    prompts = sorted(grouped)
    return prompts, np.asarray([float(np.median(grouped[p])) for p in prompts])


class Embedder:
    """The recipe's untrained encoder (torch fp32, first ENCODER_LAYERS layers)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.tokenizer = PromptTokenizer(minilm_dir() / "tokenizer.json")
        self.encoder = build_encoder(ENCODER_LAYERS)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return embed_prompts(self.encoder, self.tokenizer, prompts, progress=False)


def train_predictor_dir(
    embedder: Embedder, training: list[LengthRecord], seed: int, out: Path
) -> LengthPredictor:
    """Train the recipe on length records (weighted and grouped as the recipe does, CC BY-NC
    sources allowed: measurement only): fine-tune a fresh encoder, fit the head, and write
    both as ONNX beside the shipped tokenizer and metadata."""
    data = group_records(weighted_records(training), measurement_only=True)
    prompts = data.prompts
    frozen = embedder(prompts)
    encoder = build_encoder(ENCODER_LAYERS)
    tune_encoder(encoder, embedder.tokenizer, data, frozen, seed, verbose=False)
    tuned = embed_prompts(encoder, embedder.tokenizer, prompts, progress=False)
    cues = cue_feature_matrix(prompts)
    head, _ = fit_head(frozen, cues, data, seed, verbose=False, final_embeddings=tuned)
    out.mkdir(parents=True, exist_ok=True)
    export_encoder(encoder, out / ENCODER_FILE, quantize=True)
    shipped = shipped_model_dir()
    if not (out / TOKENIZER_FILE).exists():
        (out / TOKENIZER_FILE).symlink_to(shipped / TOKENIZER_FILE)
    write_head_onnx(head, out / "head.onnx")
    with open(shipped / METADATA_FILE, encoding="utf-8") as handle:
        metadata = json.load(handle)
    metadata["offsets"] = [float(o) for o in head.offsets]
    with open(out / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle)
    return LengthPredictor.load(out)


def scratch_dir() -> Path:
    """A temporary folder for benchmark-trained heads."""
    return Path(tempfile.mkdtemp(prefix="edgeorch-pred-bench-"))


def machine() -> str:
    """One line naming the machine, for the results table."""
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def emit_report(report: dict[str, object], out: Path | None, as_json: bool) -> bool:
    """Write the report to `out` when given and print it as JSON when asked; True if printed
    (the caller prints its table otherwise)."""
    text = json.dumps(report, indent=1)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    if as_json:
        print(text)
    return as_json


def records(name: str) -> list[LengthRecord]:
    """Records of a shared length file."""
    return load_records(shared_file(name))
