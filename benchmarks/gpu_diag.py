"""Where a GPU build of llama.cpp fails to load or run a model, each way in a process of its own.

Loads MODEL through llama.cpp's C API with every layer on the CPU, and offloaded in several
ways that each leave out one suspect of the load: the CPU's extra weight buffers (llama.cpp's
AMX and repacked layouts, `use_extra_bufts`), pinned host memory for the upload
(`GGML_CUDA_NO_PINNED`), the memory map, or all layers but one. Each way runs in a child
process, so a crash in one (the first CUDA build tried here died with SIGSEGV inside
`llama_model_load_from_file`) is reported with its signal and llama.cpp's last log lines
instead of ending the check; the first way that crashes runs once more under `cuda-gdb` (the
lent machines have no gdb) for a native backtrace. Each way that loads then decodes a short
greedy stream and reports tokens/s.

    python benchmarks/gpu_diag.py MODEL [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS: Final = {
    "cpu": {"n_gpu_layers": 0},
    "gpu": {"n_gpu_layers": -1},
    "gpu-no-extra-buffers": {"n_gpu_layers": -1, "use_extra_bufts": False},
    "gpu-no-pinned": {"n_gpu_layers": -1},
    "gpu-no-mmap": {"n_gpu_layers": -1, "use_mmap": False},
    "gpu-one-layer": {"n_gpu_layers": 1},
}
ENVIRONMENTS: Final = {"gpu-no-pinned": {"GGML_CUDA_NO_PINNED": "1"}}
DECODE_TOKENS: Final = 64
CHILD_TIMEOUT_S: Final = 120
BACKTRACE_LINES: Final = 40
LOG_TAIL_LINES: Final = 25


def child(model: Path, way: str) -> dict[str, Any]:
    """Load and decode in this process (the parent reads the JSON line it prints last)."""
    import logging

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
    from orchestrator.llamalib import llama_cpp

    lib = llama_cpp()
    params = lib.llama_model_default_params()
    for name, value in WAYS[way].items():
        setattr(params, name, value)
    started = time.perf_counter()
    model_ptr = lib.llama_model_load_from_file(str(model).encode(), params)
    if not model_ptr:
        return {"loaded": False}
    load_s = time.perf_counter() - started
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = 512, 512
    ctx = lib.llama_init_from_model(model_ptr, cparams)
    vocab = lib.llama_model_get_vocab(model_ptr)
    tokens = (ctypes.c_int32 * 64)()
    prompt = b"The capital of France is"
    n = lib.llama_tokenize(vocab, prompt, len(prompt), tokens, 64, True, True)
    batch = lib.llama_batch_get_one(tokens, n)
    if lib.llama_decode(ctx, batch):
        return {"loaded": True, "load_s": load_s, "decoded": False}
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    token = (ctypes.c_int32 * 1)()
    started = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        token[0] = int(logits.argmax())
        if lib.llama_decode(ctx, lib.llama_batch_get_one(token, 1)):
            return {"loaded": True, "load_s": load_s, "decoded": False}
    decode_s = time.perf_counter() - started
    lib.llama_free(ctx)
    lib.llama_model_free(model_ptr)
    return {
        "loaded": True,
        "load_s": round(load_s, 3),
        "decoded": True,
        "decode_tokens_s": round(DECODE_TOKENS / decode_s, 1),
        "offload_supported": bool(lib.llama_supports_gpu_offload()),
    }


def child_command(model: Path, way: str) -> list[str]:
    return [sys.executable, "-X", "faulthandler", __file__, str(model), "--child", way]


def backtrace(model: Path, way: str) -> list[str]:
    """The native stack of a crashing way, from cuda-gdb where the machine has it."""
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        return ["no cuda-gdb or gdb on this machine"]
    command = [
        debugger,
        "-batch",
        "-ex",
        "run",
        "-ex",
        "bt 30",
        "--args",
        *child_command(model, way),
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env={**os.environ, **ENVIRONMENTS.get(way, {})},
        )
    except subprocess.TimeoutExpired:
        return [f"{debugger} gave no answer in {CHILD_TIMEOUT_S} s"]
    frames = [line for line in done.stdout.splitlines() if line.startswith("#")]
    return frames or done.stdout.splitlines()[-BACKTRACE_LINES:]


def run_way(model: Path, way: str) -> dict[str, Any]:
    try:
        done = subprocess.run(
            child_command(model, way),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env={**os.environ, **ENVIRONMENTS.get(way, {})},
        )
    except subprocess.TimeoutExpired:
        return {"way": way, "outcome": f"no answer in {CHILD_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {"way": way, "outcome": "ok", **json.loads(lines[-1])}
    code = done.returncode
    outcome = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    return {"way": way, "outcome": outcome, "log_tail": done.stderr.splitlines()[-LOG_TAIL_LINES:]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--child", choices=sorted(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of: %(default)s")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child)))
        return
    results = [run_way(args.model, way) for way in args.ways.split(",")]
    crashed = [r for r in results if r["outcome"].startswith("signal")]
    if crashed:
        crashed[0]["backtrace"] = backtrace(args.model, crashed[0]["way"])
    for result in results:
        print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
