"""Measured device speed: prefill tokens/s and aggregate decode tokens/s at several numbers of
concurrent sequences, through the engine itself. Cached per (model, engine settings, device,
llama.cpp build), so an agent restart on the same device costs nothing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import psutil

from agents.base import Completed, Emitted, Engine, Rejected, SequenceSpec
from agents.model import cache_dir
from orchestrator.errors import Overloaded
from orchestrator.protocol import GenerationParams

log = logging.getLogger("edgeorch.probe")

PROBE_PREFILL_WORDS: Final = 400
PROBE_DECODE_TOKENS: Final = 24
PROBE_WARMUP_STEPS: Final = 2
PROBE_CONCURRENCY: Final = (1, 4, 16)
PROBE_PROMPT: Final = "Describe the water cycle in detail, step by step, for a student."
CACHE_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class SpeedProfile:
    prefill_tps: float
    decode_curve: tuple[tuple[int, float], ...]
    """(concurrent sequences, aggregate decode tokens/s), ascending."""

    @property
    def decode_tps(self) -> float:
        """One stream's decode rate."""
        return self.decode_curve[0][1]


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def concurrency_points(max_seqs: int) -> list[int]:
    return sorted({min(c, max_seqs) for c in PROBE_CONCURRENCY} | {max_seqs})


def measure_speed(engine: Engine, clock: Callable[[], float] = time.perf_counter) -> SpeedProfile:
    """Run short greedy generations through ``engine`` (it must be idle), timed by ``clock``."""
    words = min(PROBE_PREFILL_WORDS, engine.n_ctx // 2)
    prefill_tokens, prefill_s = _run(engine, [" ".join(["probe"] * words)], 1, clock)
    curve = []
    for concurrency in concurrency_points(engine.max_seqs):
        prompts = [f"{PROBE_PROMPT} ({i})" for i in range(concurrency)]
        try:
            tokens, seconds = _run(engine, prompts, PROBE_DECODE_TOKENS, clock)
        except Overloaded:
            break  # the KV budget holds fewer sequences than the slots: the curve ends here
        curve.append((concurrency, round(tokens / seconds, 1)))
    return SpeedProfile(prefill_tps=round(prefill_tokens / prefill_s, 1), decode_curve=tuple(curve))


def _run(
    engine: Engine, prompts: list[str], max_tokens: int, clock: Callable[[], float]
) -> tuple[int, float]:
    """(tokens, seconds): prompt tokens over prefill time for one-token runs, else decoded
    tokens over the time of the steps after warm-up (prefill excluded)."""
    params = GenerationParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, cache_prompt=False
    )
    for i, prompt in enumerate(prompts):
        for event in engine.add(SequenceSpec(f"probe-{i}", 1, prompt, params)):
            if isinstance(event, Rejected):
                for key in engine.active_keys():
                    engine.cancel(key)
                raise event.error
    if max_tokens == 1:
        started = clock()
        prompt_tokens = 0
        while engine.has_work():
            prompt_tokens += sum(e.prompt_tokens for e in engine.step() if isinstance(e, Completed))
        return prompt_tokens, clock() - started
    for _ in range(PROBE_WARMUP_STEPS):
        engine.step()
    started = clock()
    tokens = 0
    while engine.has_work():
        tokens += sum(e.n_tokens for e in engine.step() if isinstance(e, Emitted))
    return tokens, clock() - started


def cached_speed(engine: Engine, environ: Mapping[str, str], build: str) -> SpeedProfile:
    """The device's speed profile, measured once per key and then read from the cache."""
    key = {
        "version": CACHE_VERSION,
        "model": engine.model_path,
        "model_size": Path(engine.model_path).stat().st_size if engine.model_path else 0,
        "n_ctx": engine.n_ctx,
        "max_seqs": engine.max_seqs,
        "kv_budget_tokens": engine.kv_budget_tokens,
        "threads": engine.threads,
        "n_gpu_layers": engine.n_gpu_layers,
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}",
        "build": build,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(environ) / "probe" / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / "probe.lock").open("w") as lock:
        # One probe at a time per machine: agents started together would slow each other down
        # and record each other's contention; the later ones then find the cache filled.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _read_or_measure(engine, path, key)


def _read_or_measure(engine: Engine, path: Path, key: Mapping[str, object]) -> SpeedProfile:
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return SpeedProfile(
                prefill_tps=float(data["prefill_tps"]),
                decode_curve=tuple((int(c), float(t)) for c, t in data["decode_curve"]),
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable probe cache %s", path)
    log.info("measuring device speed (once per model and settings; cached in %s)", path.parent)
    profile = measure_speed(engine)
    path.write_text(json.dumps({**asdict(profile), "key": key}, indent=2))
    log.info(
        "prefill %.0f tok/s; decode %s",
        profile.prefill_tps,
        ", ".join(f"{tps:.0f} tok/s at {c}" for c, tps in profile.decode_curve),
    )
    return profile
