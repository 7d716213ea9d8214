"""``edgeorch bench``: replay a trace through the simulator (``--sim``) under several policies
on the same arrivals, and write the JSON of ../shared/DESIGN.md plus a PNG next to it.

Arrivals are scaled so that the offered decode load is ``--load`` times the cluster's nominal
decode capacity (the sum over devices of tokens/s at a full batch), or to a mean of ``--rate``
requests/s. Every request generates exactly its trace length (times ``--length-scale``, capped
by ``--max-output-tokens``); its ``max_tokens`` is the same for all requests (the cap, or the
longest answer; lowered only where prompt + cap exceeds every device's context, see
``request_budgets``), so the scheduler learns nothing of a request's length from it.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from orchestrator.core.estimate import LengthEstimate
from orchestrator.errors import InvalidRequest
from orchestrator.lengths import (
    FakePredictor,
    RealEstimates,
    exact_estimates,
    kendall_tau,
    parse_predictor,
)
from orchestrator.settings import (
    SchedulingTunables,
    driver_settings,
    load_settings,
    tunable_flags,
)
from orchestrator.sim import SIM_UNAVAILABLE_TIMEOUT_S, SimReport, SimRequest, Simulator
from orchestrator.sim_cache import infinite_cache_reuse
from orchestrator.sim_cluster import Cluster
from orchestrator.tokens import EstimatedTokenCounter
from orchestrator.traces import (
    TraceRow,
    arrival_scale,
    load_trace,
    output_lengths,
    request_budgets,
)

if TYPE_CHECKING:
    from orchestrator.live_bench import LiveCluster

DEFAULT_SEED: Final = 1
PROGRESS_BAR_WIDTH: Final = 30
PERCENTILES: Final = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class BenchSpec:
    trace: Path
    cluster: Cluster | None
    policies: tuple[str, ...]
    loads: tuple[float, ...]
    rate: float | None
    placement: str
    length_scale: float
    max_output_tokens: int | None
    max_requests: int | None
    predictor: str
    seed: int
    tunables: SchedulingTunables = field(default_factory=lambda: SchedulingTunables())
    adapt_every: int = 0
    live: LiveCluster | None = None
    load_basis: str = "decode"
    """``decode``: --load is decode tokens against decode capacity (../shared/DESIGN.md);
    ``work``: prefill time (nothing cached) counts too."""
    prefix_cache: bool = True
    prefix_eviction: str = "lru"


def _positive(value: float, flag: str) -> float:
    if not value > 0 or math.isinf(value):
        raise InvalidRequest(f"{flag} must be a positive number, got {value}", field=flag[2:])
    return value


def bench_spec_from_args(args: Any) -> BenchSpec:
    """Validate the ``edgeorch bench`` flags into a spec; bad input raises InvalidRequest."""
    from orchestrator.core.policies import POLICIES
    from orchestrator.sim_cluster import load_cluster

    live = None
    if args.live:
        from orchestrator.live_bench import LiveCluster
        from orchestrator.local import threads_per_agent

        if args.agents < 1:
            raise InvalidRequest(f"--agents must be at least 1, got {args.agents}", field="agents")
        agent_args: tuple[str, ...] = ()
        for flag, value in (
            ("--threads", args.threads or threads_per_agent(args.agents)),
            ("--max-seqs", args.max_seqs),
            ("--n-ctx", args.n_ctx),
            ("--kv-budget-tokens", args.kv_budget_tokens),
        ):
            if value is not None:
                agent_args += (flag, str(value))
        live = LiveCluster(agents=args.agents, backend=args.backend, agent_args=agent_args)
    elif args.cluster is None:
        raise InvalidRequest(
            "--sim needs --cluster F (e.g. configs/cluster-edge.toml)", field="cluster"
        )
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise InvalidRequest(
            f"--policies: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(sorted(POLICIES))}",
            field="policies",
        )
    if len(set(policies)) != len(policies):
        raise InvalidRequest(f"--policies lists a policy twice: {args.policies}", field="policies")
    loads: tuple[float, ...] = ()
    if args.load is not None:
        try:
            loads = tuple(float(x) for x in str(args.load).split(","))
        except ValueError:
            raise InvalidRequest(f"--load needs numbers, got {args.load!r}", field="load") from None
        for load in loads:
            _positive(load, "--load")
    else:
        _positive(args.rate, "--rate")
    _positive(args.length_scale, "--length-scale")
    for flag, value in (
        ("--max-output-tokens", args.max_output_tokens),
        ("--max-requests", args.max_requests),
    ):
        if value is not None and value < 1:
            raise InvalidRequest(f"{flag} must be at least 1, got {value}", field=flag[2:])
    parse_predictor(args.predictor)
    if args.adapt_every < 0:
        raise InvalidRequest(
            f"--adapt-every must be 0 or more, got {args.adapt_every}", field="adapt_every"
        )
    tunables = load_settings(
        SchedulingTunables,
        config=None,
        environ={},
        overrides={k: v for k, v in vars(args).items() if k in SchedulingTunables.model_fields},
    )
    if live is not None and len(loads) > 1:
        raise InvalidRequest("--live runs one --load at a time, not a sweep", field="load")
    return BenchSpec(
        trace=args.trace,
        cluster=None if live is not None else _cache_tiers(load_cluster(args.cluster), args),
        live=live,
        policies=policies,
        loads=loads,
        rate=args.rate,
        placement=args.placement,
        length_scale=args.length_scale,
        max_output_tokens=args.max_output_tokens,
        max_requests=args.max_requests,
        predictor=args.predictor,
        seed=args.seed,
        tunables=tunables,
        adapt_every=args.adapt_every,
        load_basis=args.load_basis,
        prefix_cache=args.prefix_cache != "off",
        prefix_eviction=args.prefix_eviction,
    )


def _cache_tiers(cluster: Cluster, args: Any) -> Cluster:
    """The cluster as ``--prefix-cache`` wants it: ``memory`` takes the devices' disks away."""
    if args.prefix_cache != "memory":
        return cluster
    return replace(
        cluster, devices=tuple(replace(d, prefix_disk_tokens=0) for d in cluster.devices)
    )


def request_id(index: int) -> str:
    return f"r{index:05d}"


def estimates_for(
    kind: str, tau: float, rows: Sequence[TraceRow], lengths: Sequence[int], spec: BenchSpec
) -> tuple[list[LengthEstimate], RealEstimates | None, float]:
    """Estimates for the non-oracle policies, the real predictor when it adapts during the
    run, and the Kendall tau of the (unadapted) estimates against the truth."""
    online = None
    if kind == "real":
        ids = [request_id(i) for i in range(len(rows))]
        real = RealEstimates(
            [r.prompt for r in rows],
            ids,
            spec.length_scale,
            spec.adapt_every,
            [r.conversation for r in rows],
        )
        estimates = real.base
        online = real if spec.adapt_every > 0 else None
    else:
        fake = FakePredictor.for_tau(tau, lengths, spec.seed, calibrated=kind == "calibrated")
        estimates = fake.estimates(lengths)
    measured = kendall_tau([e.quantile(0.5) for e in estimates], lengths)
    return estimates, online, measured


def run_bench(
    spec: BenchSpec, progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    rows = load_trace(spec.trace, spec.max_requests)
    lengths = output_lengths(rows, spec.length_scale, spec.max_output_tokens)
    if spec.live is not None:
        from orchestrator.live_bench import run_live

        return run_live(
            trace=spec.trace,
            rows=rows,
            lengths=lengths,
            policies=spec.policies,
            placement=spec.placement,
            load=spec.loads[-1] if spec.loads else None,
            rate=spec.rate,
            cluster=spec.live,
            progress=progress,
            max_tokens=spec.max_output_tokens,
            coordinator_args=tunable_flags(spec.tunables),
        )
    assert spec.cluster is not None
    counter = EstimatedTokenCounter()
    prompt_tokens = [
        counter.count(r.prompt, None)[0] if r.prompt_tokens is None else r.prompt_tokens
        for r in rows
    ]
    prefixes = [r.prefix if spec.prefix_cache else None for r in rows]
    bound = (
        infinite_cache_reuse((r.prefix, n) for r, n in zip(rows, prompt_tokens, strict=True))
        if any(r.prefix for r in rows)
        else None
    )
    cap = spec.max_output_tokens or max(lengths)
    budgets = request_budgets(prompt_tokens, cap, spec.cluster.context_limit_tokens)
    lengths = [min(length, budget) for length, budget in zip(lengths, budgets, strict=True)]
    kind, tau = parse_predictor(spec.predictor)
    estimates, online, measured_tau = estimates_for(kind, tau, rows, lengths, spec)
    truth = exact_estimates(lengths)
    capacity = spec.cluster.capacity_tokens_s
    sweep: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    loads: Sequence[float | None] = spec.loads or [None]
    for load in loads:
        prefill = (
            (prompt_tokens, spec.cluster.prefill_tokens_s) if spec.load_basis == "work" else None
        )
        factor = arrival_scale(rows, lengths, capacity, load, spec.rate, prefill)
        start = rows[0].arrival_s
        results: dict[str, Any] = {}
        for name in spec.policies:
            config = driver_settings(
                spec.tunables,
                policy=name,
                placement=spec.placement,
                unavailable_timeout_s=SIM_UNAVAILABLE_TIMEOUT_S,
            ).scheduler
            policy = config.policy
            chosen = truth if policy.needs_truth else estimates
            requests = [
                SimRequest(
                    request_id=request_id(i),
                    arrival_s=(row.arrival_s - start) * factor,
                    prompt_tokens=prompt_tokens[i],
                    output_tokens=lengths[i],
                    max_tokens=budgets[i],
                    estimate=chosen[i],
                    prompt_blocks=prefixes[i],
                    follows=None if row.follows is None else request_id(row.follows),
                    gap_s=row.gap_s,
                )
                for i, row in enumerate(rows)
            ]
            label = f"{name} load {load}" if load is not None else f"{name} rate {spec.rate}"
            began, cpu_began = time.perf_counter(), time.process_time()
            adapting = None if online is None or policy.needs_truth else online.fresh()
            report = Simulator(spec.cluster, config, eviction=spec.prefix_eviction).run(
                requests,
                None if progress is None else functools.partial(progress, label),
                adapting,
            )
            wall = time.perf_counter() - began
            cpu = time.process_time() - cpu_began
            results[name] = policy_stats(report)
            if bound is not None:
                results[name]["prompt_tokens"] = report.prompt_tokens
                results[name]["reused_prompt_tokens"] = report.reused_prompt_tokens
                results[name]["reuse_vs_infinite_cache"] = round(
                    report.reused_prompt_tokens / max(1, bound), 4
                )
            diagnostics.setdefault(str(load), {})[name] = {
                "sim_wall_s": round(wall, 3),
                "sim_cpu_s": round(cpu, 3),
                "events": report.events,
                "decisions": report.decisions,
                "priority_preemptions": report.preemptions,
                "kv_preemptions": report.kv_preemptions,
                "kv_lent_tokens": report.kv_lent_tokens,
                "max_kv_overuse_tokens": round(report.max_kv_overuse_tokens, 3),
                "makespan_s": round(report.end_s, 3),
            }
            if adapting is not None:
                diagnostics[str(load)][name]["predictor_adaptations"] = adapting.adaptations
        sweep.append({"load": load, "policies": results})
    out: dict[str, Any] = {
        "trace": str(spec.trace),
        "load": spec.loads[-1] if spec.loads else None,
        "rate": spec.rate,
        "capacity_tokens_s": round(capacity, 3),
        "placement": spec.placement,
        "mode": "sim",
        "cluster": spec.cluster.describe(),
        "policies": sweep[-1]["policies"],
    }
    if len(sweep) > 1:
        out["sweep"] = sweep
    out["predictor"] = {"kind": kind, "kendall_tau": round(measured_tau, 4)}
    if kind == "real":
        out["predictor"]["adapt_every"] = spec.adapt_every
    out["settings"] = {
        "length_scale": spec.length_scale,
        "max_output_tokens": spec.max_output_tokens,
        "max_requests": spec.max_requests,
        "requests": len(rows),
        "mean_output_tokens": round(float(np.mean(lengths)), 1),
        "max_tokens_cut_to_context": sum(budget < cap for budget in budgets),
        "seed": spec.seed,
        "tunables": spec.tunables.model_dump(),
    }
    if bound is not None:
        out["prefix_cache"] = {
            "enabled": spec.prefix_cache,
            "prompt_tokens": sum(prompt_tokens),
            "infinite_cache_reused_tokens": bound,
            "eviction": spec.prefix_eviction,
            "disk_tokens": sum(d.prefix_disk_tokens for d in spec.cluster.devices),
        }
    out["settings"]["load_basis"] = spec.load_basis
    out["diagnostics"] = diagnostics
    return out


def policy_stats(report: SimReport) -> dict[str, Any]:
    """The per-policy object of the bench JSON."""
    done = [o for o in report.outcomes if not o.failed and o.finished_s is not None]
    jct = np.array([o.finished_s - o.arrival_s for o in done if o.finished_s is not None])
    ttft = np.array([(o.first_token_s - o.arrival_s) for o in done if o.first_token_s is not None])
    tokens = np.array([max(1, o.output_tokens) for o in done])
    first = min((o.arrival_s for o in report.outcomes), default=0.0)
    last = max((o.finished_s for o in done if o.finished_s is not None), default=first)

    def pct(values: np.ndarray, p: float) -> float:
        return round(float(np.percentile(values, p)), 4) if len(values) else math.nan

    def mean(values: np.ndarray) -> float:
        return round(float(values.mean()), 4) if len(values) else math.nan

    return {
        "completed": len(done),
        "failed": len(report.outcomes) - len(done),
        "mean_jct_s": mean(jct),
        "p50_jct_s": pct(jct, 50),
        "p90_jct_s": pct(jct, 90),
        "p99_jct_s": pct(jct, 99),
        "mean_ttft_s": mean(ttft),
        "p99_ttft_s": pct(ttft, 99),
        "mean_norm_latency_s_per_token": mean(jct / tokens) if len(jct) else math.nan,
        "throughput_tokens_s": round(float(tokens.sum()) / max(1e-9, last - first), 3),
        "preemptions": report.preemptions + report.kv_preemptions,
        "_jct_samples": jct.tolist(),
    }


def strip_samples(result: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Remove the per-request JCTs from every policy object (kept aside for plotting)."""
    samples: dict[str, dict[str, list[float]]] = {}
    for entry in result.get("sweep", [{"load": result["load"], "policies": result["policies"]}]):
        for name, stats in entry["policies"].items():
            values = stats.pop("_jct_samples", None)
            if values is not None:
                samples.setdefault(str(entry["load"]), {})[name] = values
    for stats in result["policies"].values():
        stats.pop("_jct_samples", None)
    return samples


def write_plot(
    result: dict[str, Any], samples: dict[str, dict[str, list[float]]], path: Path
) -> None:
    """Latency CDF per policy at the last load, and mean JCT against load when swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result.get("sweep")
    panels = 2 if sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    last = list(samples)[-1]
    ax = axes[0][0]
    for name, values in samples[last].items():
        xs = np.sort(np.asarray(values))
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of requests")
    where = f"load {result['load']}" if result["load"] is not None else f"rate {result['rate']}/s"
    ax.set_title(f"JCT CDF, {result['cluster']['name']}, {where}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if sweep:
        ax = axes[0][1]
        loads = [entry["load"] for entry in sweep]
        for name in sweep[-1]["policies"]:
            ax.plot(
                loads, [entry["policies"][name]["mean_jct_s"] for entry in sweep], "o-", label=name
            )
        ax.set_xlabel("offered load (x nominal decode capacity)")
        ax.set_ylabel("mean JCT (s)")
        ax.set_yscale("log")
        ax.set_title(f"mean JCT vs load ({result['placement']} placement)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self._label = ""

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self._label and self._label:
            self.stream.write("\n")
        self._label = label
        filled = int(PROGRESS_BAR_WIDTH * done / max(1, total))
        bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
        self.stream.write(f"\r{label:<24} [{bar}] {done}/{total}")
        self.stream.flush()

    def close(self) -> None:
        if self._label:
            self.stream.write("\n")
            self.stream.flush()


def write_outputs(result: dict[str, Any], json_path: Path) -> Path:
    """Write the JSON and the PNG next to it; returns the PNG's path."""
    samples = strip_samples(result)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = json_path.with_suffix(".png")
    write_plot(result, samples, png)
    return png
