"""What a mixed step costs in each KV layout: one ``llama_decode`` of 3 decode rows and a prompt
chunk, beside three sequences of ``--context`` tokens, timed on the default model through
llama.cpp's low-level API (no engine, no scheduler).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kv_layout.py \\
        --json docs/results/kv-layout.json

Each ``--variant LAYOUT:FLASH:SWA_FULL`` is one context: ``pool`` (one KV pool all sequences
share, ``kv_unified``) or ``streams`` (one per sequence); flash attention -1 (auto), 0 or 1;
full-size (1) or window-only (0) sliding-window caches. Reported per variant (medians): the
mixed step, the chunk alone, the 3 decode rows alone, and what the chunk adds to the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.model import ensure_default_model
from orchestrator.llamalib import llama_cpp

SEQUENCES: Final = 4
CELLS: Final = 16384
CHUNK_START: Final = 1024
"""Position where the timed prompt chunk starts (the sequence holds that many tokens)."""
REPEATS: Final = 5
DEFAULT_VARIANTS: Final = ("pool:-1:1", "streams:-1:1", "pool:-1:0", "streams:-1:0")


class Bench:
    def __init__(self, threads: int) -> None:
        self.lib = llama_cpp()
        params = self.lib.llama_model_default_params()
        params.n_gpu_layers = 0
        path = ensure_default_model(os.environ)
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        self.batch = self.lib.llama_batch_init(2048, 0, 1)
        self.threads = threads

    def put(self, row: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[row], batch.pos[row], batch.n_seq_id[row] = token, pos, 1
        batch.seq_id[row][0], batch.logits[row] = seq, logits

    def decode(self, ctx: Any, n: int) -> float:
        self.batch.n_tokens = n
        started = time.perf_counter()
        if self.lib.llama_decode(ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    def variant(
        self, layout: str, flash: int, swa_full: bool, context: int, chunk: int
    ) -> dict[str, Any]:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = CELLS, 2048, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = SEQUENCES, *(self.threads,) * 2
        params.kv_unified, params.swa_full = layout == "pool", swa_full
        params.flash_attn_type, params.no_perf = flash, True
        ctx = lib.llama_init_from_model(self.model, params)
        memory = lib.llama_get_memory(ctx)
        others = SEQUENCES - 1
        try:
            for seq, length in [*((s, context) for s in range(others)), (others, CHUNK_START)]:
                for start in range(0, length, 512):
                    end = min(length, start + 512)
                    for row, pos in enumerate(range(start, end)):
                        self.put(row, 100 + pos % 5000, pos, seq, pos == length - 1)
                    self.decode(ctx, end - start)

            def step(rows: bool, prompt: bool) -> float:
                n = 0
                if rows:
                    for seq in range(others):
                        self.put(n, 7, context, seq, True)
                        n += 1
                if prompt:
                    for i in range(chunk):
                        self.put(n, 300 + i, CHUNK_START + i, others, i == chunk - 1)
                        n += 1
                seconds = self.decode(ctx, n)
                lib.llama_memory_seq_rm(memory, others, CHUNK_START, -1)
                for seq in range(others):
                    lib.llama_memory_seq_rm(memory, seq, context, -1)
                return seconds

            step(True, True)
            mixed = statistics.median(step(True, True) for _ in range(REPEATS))
            alone = statistics.median(step(False, True) for _ in range(REPEATS))
            rows = statistics.median(step(True, False) for _ in range(REPEATS))
        finally:
            lib.llama_free(ctx)
        return {
            "variant": f"{layout}:{flash}:{int(swa_full)}",
            "mixed_ms": round(mixed * 1e3, 1),
            "chunk_alone_ms": round(alone * 1e3, 1),
            "decode_rows_ms": round(rows * 1e3, 1),
            "chunk_ms_per_token_beside_rows": round((mixed - rows) / chunk * 1e3, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--context", type=int, default=1200, help="tokens of each other sequence")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bench = Bench(args.threads)
    results = []
    for text in args.variant or DEFAULT_VARIANTS:
        layout, flash, swa = text.split(":")
        if layout not in ("pool", "streams"):
            parser.error(f"layout {layout!r}: choose pool or streams")
        result = bench.variant(layout, int(flash), swa == "1", args.context, args.chunk)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    report = {
        "context_tokens": args.context,
        "chunk_tokens": args.chunk,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "variants": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
