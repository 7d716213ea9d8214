"""Figures of benchmarks/multiturn.py: per-run outcomes, medians over repetitions, and the
ratios that matter."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from benchmarks.multiturn_data import Workload

# --- figures --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: ``group`` is the conversation (or request) index, ``turn`` the turn in it
    (0 for single-turn requests); times are seconds from the run's start."""

    group: int
    turn: int
    prompt_tokens: int
    requested_tokens: int
    sent_s: float
    first_s: float | None
    end_s: float
    reported_tokens: int | None = None
    reused_tokens: int | None = None
    computed_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.first_s is not None
            and (self.reported_tokens is None or self.reported_tokens == self.requested_tokens)
        )

    @property
    def ttft_s(self) -> float:
        return (self.first_s if self.first_s is not None else self.end_s) - self.sent_s

    @property
    def total_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def output_tokens(self) -> int:
        return self.reported_tokens if self.reported_tokens is not None else self.requested_tokens


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _percentile(values: Sequence[float], p: float) -> float | None:
    return round(float(np.percentile(values, p)), 4) if values else None


def _wall_s(outcomes: Sequence[Outcome]) -> float:
    if not outcomes:
        return 0.0
    return max(o.end_s for o in outcomes) - min(o.sent_s for o in outcomes)


def _per_s(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 3) if seconds > 0 else None


def cpu_used(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two readings: the servers' share of the machine,
    which on a VM with as many cores as engine threads is taken from the engine."""
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


def reused_fraction(reused: int | None, computed: int | None) -> float | None:
    if reused is None or computed is None or reused + computed == 0:
        return None
    return round(reused / (reused + computed), 4)


def request_reuse(outcomes: Sequence[Outcome]) -> tuple[int | None, int | None]:
    """Prompt tokens reused and computed, summed over requests, when every request says."""
    if not outcomes or any(o.reused_tokens is None or o.computed_tokens is None for o in outcomes):
        return None, None
    return (
        sum(o.reused_tokens or 0 for o in outcomes),
        sum(o.computed_tokens or 0 for o in outcomes),
    )


def _unchecked(outcomes: Sequence[Outcome]) -> int:
    """Answers whose length the server did not report, so it could not be checked."""
    return sum(1 for o in outcomes if o.error is None and o.reported_tokens is None)


def multiturn_figures(
    outcomes: Sequence[Outcome], stopped_early: int, reused_prompt_fraction: float | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    wall = _wall_s(outcomes)
    turns = max((o.turn for o in ok), default=-1) + 1
    turn_times = [o.total_s for o in ok]
    return {
        "turns": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "unchecked_lengths": _unchecked(outcomes),
        "stopped_early": stopped_early,
        "mean_ttft_later_turns_s": _mean([o.ttft_s for o in ok if o.turn > 0]),
        "mean_ttft_first_turn_s": _mean([o.ttft_s for o in ok if o.turn == 0]),
        "mean_turn_s": _mean(turn_times),
        "p90_turn_s": _percentile(turn_times, 90),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": _per_s(sum(o.output_tokens for o in ok), wall),
        "mean_prompt_tokens": _mean([o.prompt_tokens for o in ok]),
        "reused_prompt_fraction": reused_prompt_fraction,
        "ttft_by_turn_s": [_mean([o.ttft_s for o in ok if o.turn == t]) for t in range(turns)],
    }


def prompt_heavy_figures(
    outcomes: Sequence[Outcome], reused_prompt_fraction: float | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    wall = _wall_s(outcomes)
    ttft = [o.ttft_s for o in ok]
    jct = [o.total_s for o in ok]
    output = sum(o.output_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "unchecked_lengths": _unchecked(outcomes),
        "mean_ttft_s": _mean(ttft),
        "p50_ttft_s": _percentile(ttft, 50),
        "p99_ttft_s": _percentile(ttft, 99),
        "mean_jct_s": _mean(jct),
        "p99_jct_s": _percentile(jct, 99),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": _per_s(output, wall),
        "total_tokens_per_s": _per_s(output + sum(o.prompt_tokens for o in ok), wall),
        "reused_prompt_fraction": reused_prompt_fraction,
    }


def config_medians(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration, the median over its runs of every numeric figure (runs where a
    figure is missing are left out of its median; lists and mappings are medianed element-wise)."""
    medians: dict[str, dict[str, Any]] = {}
    for name, figures in runs.items():
        keys = dict.fromkeys(key for run in figures for key in run)
        medians[name] = {key: _median_of([run.get(key) for run in figures]) for key in keys}
    return medians


def _median_of(values: Sequence[Any]) -> Any:
    if any(isinstance(v, Mapping) for v in values):
        maps = [v for v in values if isinstance(v, Mapping)]
        keys = dict.fromkeys(key for m in maps for key in m)
        return {key: _median_of([m.get(key) for m in maps]) for key in keys}
    if any(isinstance(v, list) for v in values):
        lists = [v for v in values if isinstance(v, list)]
        width = max(len(v) for v in lists)
        return [_median_of([v[i] for v in lists if i < len(v)]) for i in range(width)]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    median = statistics.median(numbers)
    if all(isinstance(v, int) for v in numbers) and float(median).is_integer():
        return int(median)
    return round(float(median), 4)


def _ratio(
    medians: Mapping[str, Mapping[str, Any]], top: str, bottom: str, key: str
) -> float | None:
    a = medians.get(top, {}).get(key)
    b = medians.get(bottom, {}).get(key)
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return round(a / b, 3)


MULTITURN_RATIOS: Final = (
    (
        "edgeorch_vs_llama_server_ttft_later_turns",
        "edgeorch-cache",
        "llama-server-cache",
        "mean_ttft_later_turns_s",
    ),
    ("edgeorch_vs_llama_server_mean_turn", "edgeorch-cache", "llama-server-cache", "mean_turn_s"),
    ("edgeorch_cache_vs_nocache_mean_turn", "edgeorch-cache", "edgeorch-nocache", "mean_turn_s"),
    (
        "edgeorch_cache_vs_nocache_ttft_later_turns",
        "edgeorch-cache",
        "edgeorch-nocache",
        "mean_ttft_later_turns_s",
    ),
    (
        "llama_server_cache_vs_nocache_mean_turn",
        "llama-server-cache",
        "llama-server-nocache",
        "mean_turn_s",
    ),
)
PROMPT_HEAVY_RATIOS: Final = (
    (
        "edgeorch_vs_llama_server_throughput",
        "edgeorch-cache",
        "llama-server-cache",
        "output_tokens_per_s",
    ),
    ("edgeorch_vs_llama_server_mean_ttft", "edgeorch-cache", "llama-server-cache", "mean_ttft_s"),
    ("edgeorch_vs_llama_server_mean_jct", "edgeorch-cache", "llama-server-cache", "mean_jct_s"),
)


def headline_ratios(
    medians: Mapping[str, Mapping[str, Any]], workload: Workload
) -> dict[str, float | None]:
    """Ratios of medians (below 1: the first configuration is faster, or for throughput
    slower); None where a configuration was not run."""
    table = PROMPT_HEAVY_RATIOS if workload == "prompt-heavy" else MULTITURN_RATIOS
    return {name: _ratio(medians, top, bottom, key) for name, top, bottom, key in table}
