"""The simulator with real predictions that never saw the prompts they rank (cross-fitted).

    python -m benchmarks.sim_crossfit --trace ../shared/data/traces/azure_conv_x_mixed.jsonl \
        [bench options, e.g. --sim --cluster configs/cluster-edge.toml --load 0.9 --json OUT]

Why: the mixed trace reuses alpaca_en_demo's 985 prompts with their answers, and the shipped
predictor is trained on them, so `edgeorch bench --predictor real` ranks half the trace
in-sample. Here the recipe is trained twice, each time without one half of those prompts (split
by CRC32), and each half is predicted by the model that did not see it; the trace's other
prompts keep the shipped model's predictions (it never saw them). No adaptation: the two
models' features differ, so one calibration cannot span them. Needs the train extra.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import bench
from orchestrator.cli import main as cli_main
from orchestrator.core.estimate import LengthEstimate
from orchestrator.lengths import kendall_tau
from orchestrator.predictor.model import LengthPredictor
from orchestrator.predictor.train import DEFAULT_DATA_DIR, train
from orchestrator.textio import read_lines

IN_TRAINING_SOURCE = "alpaca_en_demo"


def half_of(prompt: str) -> int:
    return zlib.crc32(prompt.encode("utf-8")) % 2


def train_without(half: int, out: Path) -> LengthPredictor:
    """The recipe on its vendored data minus the in-training source's prompts of `half`."""
    data = out / "data"
    data.mkdir(parents=True)
    for path in sorted(DEFAULT_DATA_DIR.glob("*.jsonl")):
        lines = [line for line in read_lines(path) if line.strip()]
        kept = [
            line + "\n"
            for line in lines
            if json.loads(line).get("source") != IN_TRAINING_SOURCE
            or half_of(json.loads(line)["prompt"]) != half
        ]
        (data / path.name).write_text("".join(kept), encoding="utf-8")
    train(out_dir=out / "model", data_dir=data, seed=0, verbose=True)
    return LengthPredictor.load(out / "model")


def estimates(predictor: LengthPredictor, prompts: list[str], scale: float) -> list[Any]:
    return [
        LengthEstimate.of(
            float(p.expected_tokens) * scale,
            {float(q): float(v) * scale for q, v in p.quantiles.items()},
        )
        for p in predictor.predict_batch(prompts)
    ]


def main() -> None:
    argv = sys.argv[1:]
    trace = Path(argv[argv.index("--trace") + 1])
    rows = [json.loads(line) for line in read_lines(trace) if line.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="edgeorch-crossfit-"))
    without = [train_without(h, scratch / f"without-{h}") for h in (0, 1)]
    shipped = LengthPredictor.load()

    def crossfit_estimates(
        kind: str, tau: float, trows: Sequence[Any], lengths: Sequence[int], spec: Any
    ) -> tuple[list[Any], None, float]:
        prompts = [r.prompt for r in trows]
        scale = spec.length_scale
        by_model = [estimates(m, prompts, scale) for m in (*without, shipped)]
        chosen = []
        for i, row in enumerate(rows[: len(trows)]):
            if row["source"] == IN_TRAINING_SOURCE:
                chosen.append(by_model[half_of(row["prompt"])][i])
            else:
                chosen.append(by_model[2][i])
        parts: dict[str, list[int]] = {}
        for i, row in enumerate(rows[: len(trows)]):
            parts.setdefault(row["source"], []).append(i)
        for source, idx in sorted(parts.items()):
            tau_part = kendall_tau(
                [chosen[i].quantile(0.5) for i in idx], [lengths[i] for i in idx]
            )
            print(f"cross-fitted Kendall tau on {source} ({len(idx)}): {tau_part:.3f}", flush=True)
        measured = kendall_tau([e.quantile(0.5) for e in chosen], lengths)
        return chosen, None, measured

    bench.estimates_for = crossfit_estimates  # type: ignore[assignment]
    raise SystemExit(cli_main(["bench", *argv, "--predictor", "real", "--adapt-every", "0"]))


if __name__ == "__main__":
    main()
