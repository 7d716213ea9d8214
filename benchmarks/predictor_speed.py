"""Predictor cost: single-prompt latency on one core, batched throughput, size, memory.

    python benchmarks/predictor_speed.py --data F.jsonl [--json]

Latency: each prompt predicted alone, onnxruntime with one intra-op thread, in wall time
and in this process's CPU time (robust to other processes taking the core). Throughput:
all prompts through `predict_batch` (one thread), per wall second and per CPU second (the
latter is what one dedicated core gives when the machine is shared, as here). Memory: this
process's peak RSS after loading the predictor and predicting (no torch imported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from orchestrator.predictor.data import load_records
from orchestrator.predictor.evaluate import measure_latency
from orchestrator.predictor.model import LengthPredictor, shipped_model_dir


def folder_megabytes(path: Path) -> float:
    """Total size of the files in a folder, MB."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-prompts", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    predictor = LengthPredictor.load(threads=1)
    load_s = time.perf_counter() - started
    prompts = [r.prompt for r in load_records(args.data)][: args.max_prompts]
    p50, p99 = measure_latency(predictor, prompts, None, len(prompts))
    cpu_ms = []
    for prompt in prompts:
        cpu_started = time.process_time()
        predictor.predict(prompt)
        cpu_ms.append((time.process_time() - cpu_started) * 1000.0)
    predictor.predict_batch(prompts[:64])
    started, cpu_started = time.perf_counter(), time.process_time()
    predictor.predict_batch(prompts)
    batch_s = time.perf_counter() - started
    batch_cpu_s = time.process_time() - cpu_started
    all_cores = LengthPredictor.load(threads=os.cpu_count() or 1)
    all_cores.predict_batch(prompts[:64])
    started = time.perf_counter()
    all_cores.predict_batch(prompts)
    batch_all_cores_s = time.perf_counter() - started
    out = {
        "n": len(prompts),
        "load_s": round(load_s, 3),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "cpu_p50_ms": round(float(np.percentile(cpu_ms, 50)), 3),
        "cpu_p99_ms": round(float(np.percentile(cpu_ms, 99)), 3),
        "batched_prompts_per_s": round(len(prompts) / batch_s, 1),
        "batched_prompts_per_cpu_s": round(len(prompts) / batch_cpu_s, 1),
        "batched_prompts_per_s_all_cores": round(len(prompts) / batch_all_cores_s, 1),
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "model_mb": round(folder_megabytes(shipped_model_dir()), 2),
        "rss_mb_before_load": round(rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_imported": "torch" in sys.modules,
        "prompt_chars_median": float(np.median([len(p) for p in prompts])),
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k:24s} {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
